"""Training data: sources, pair files and their checks, the token cache, the batch plan, the data module, Stack
Exchange pairs and the packaged STS Benchmark (stsb/)."""
