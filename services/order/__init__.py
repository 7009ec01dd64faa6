"""The order service: an HTTP API that takes orders, and the order participant.

``python -m services.order`` runs both in one process.
"""
