"""The labelers' web app (`chatloop label ...`): store.py (database, assignment, metrics, exports), app.py (the
FastAPI pages and JSON API), commands.py (the command-line verbs). docs/LABELING.md is the user's guide."""
