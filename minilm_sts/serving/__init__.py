"""What a trained model is used through: load, export (with its model card) and predict."""
