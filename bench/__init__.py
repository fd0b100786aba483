"""The harness: CLI, sweep over variants, training/evaluation, measurement and reporting."""
