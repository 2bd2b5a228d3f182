"""What people read: plan and merge tables and JSON (report.py), a batch's (batch.py), the
blend picture (plot.py), the model card's text (card.py), `inspect` and `verify`."""
