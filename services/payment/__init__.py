"""The payment service: charges and refunds customers."""
