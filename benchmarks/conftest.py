"""`pytest benchmarks/` runs every case of every bench_<op>.py through pytest-benchmark."""
