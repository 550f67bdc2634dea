"""prefloop's labeling UI for annotators (Gradio, mounted in the FastAPI app)."""
