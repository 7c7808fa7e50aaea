"""Billing, the domain without HTTP: plans, subscriptions and their status rules, fulfilment,
compensation; `stripe/` speaks to Stripe, `webhooks/` takes its events in and handles them."""
