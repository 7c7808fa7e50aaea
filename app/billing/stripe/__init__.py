"""The Stripe side of `app.billing.provider.PaymentProvider`: the SDK client, the translation of
its errors, and the shapes of the objects Stripe sends."""
