"""Stripe's events, from receipt to handled: the receiver's checks, the intake that stores them,
the inbox worker that claims them, the handlers, and replay."""
