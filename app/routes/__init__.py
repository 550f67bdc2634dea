"""HTTP routes of the app: the REST API (`api.py`) and the login/logout pages (`pages.py`)."""
