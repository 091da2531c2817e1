"""The callbacks that SentenceEncoderTraining attaches to every run, one job per module: evaluation, the run
record, checkpoints beside the ranked ones, resume, mixed precision."""
