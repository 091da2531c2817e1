"""Training: the LightningModule that fine-tunes a SentenceEncoder, its losses and optimizer, and the callbacks
every run has (callbacks/, grouped by job)."""
