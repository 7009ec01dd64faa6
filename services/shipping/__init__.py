"""The shipping service: schedules and cancels shipments."""
