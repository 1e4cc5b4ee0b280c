"""Generation: token streams from a model (engine), sampling, detokenisation and chat sessions."""
