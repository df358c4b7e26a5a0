"""The recommendation service: FastAPI over per-market FAISS indexes, sessions in Redis."""
