-- 0006: guest payments. A one-time payment made without a Stripe Customer (Payment
-- Links, guest checkout) is a payment like any other: `payments.customer_id` was
-- already nullable; a one-time grant bought by a guest (a user named in metadata or
-- client_reference_id) has no customer either.
ALTER TABLE one_time_grants ALTER COLUMN customer_id DROP NOT NULL;
