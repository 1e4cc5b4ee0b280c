"""Fine-tuning: data formats with label masking (``data``), the training loop with exact resume (``train``)."""
