"""prefloop's feedback store: tables (models.py), engines and transactions (db.py), the one
write path (repo.py), migrations (migrate.py), JSONL import/export (importing.py, exporting.py).

Import-light on purpose: importing `store` loads SQLModel and nothing heavier.
"""

__version__ = "0.1.0"
