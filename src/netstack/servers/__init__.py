"""Layer 2: one package per product (messaging, models, and later wsgi, lb, chat...)."""
