"""Plain torch, no Lightning and no file readers: BERT, pooling, tokenization, SentenceEncoder (encode, similarity,
save), checkpoints and where pretrained weights come from."""
