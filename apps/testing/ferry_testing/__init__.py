"""What tests, benchmarks and the demo share: cluster harness, sample graphs, verdicts."""
