"""prefloop's AI and rule judges: batch labeling over OpenAI-compatible endpoints."""
