"""Tokenizers: ChatGLM-6B (SentencePiece) and, later, GLM-4 (tiktoken) and the prompt templates."""
