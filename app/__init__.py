"""prefloop's web service: the FastAPI app, its settings, and the REST API (see app/main.py)."""
