"""The labelers' web app (`chatloop label ...`): schema.py (the tables), store.py (LabelStore: the database work),
answers.py (tasks, answers, shown order), quality.py (agreement, gold and screening scores), reports.py (report,
plan, exports), secret.py (the server secret), app.py (the FastAPI routes), site.py (what the routes share:
sessions, CSRF, login throttle), commands.py (the verbs). docs/LABELING.md is the user's guide."""
