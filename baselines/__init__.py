"""Baseline methods (installed as `fqtbench_baselines`), each registered through the
`fqtbench.methods` entry-point group exactly like a third-party plugin."""
