"""The payments read model: the statuses a payment row can have, for its writer (the
entitlements worker) and its readers (the API's GetPayment / ListPayments / UpdatePaymentStatus)."""

PAYMENT_STATUSES = frozenset(
    {
        "pending",
        "requires_payment_method",
        "requires_confirmation",
        "requires_action",
        "processing",
        "requires_capture",
        "succeeded",
        "failed",
        "canceled",
        "refunded",
        "partially_refunded",
        "disputed",
    }
)
