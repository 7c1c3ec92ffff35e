"""Outgoing customer webhooks: endpoints, the event catalogue, durable signed deliveries.

**Envelope.** Every delivery POSTs one JSON object
`{"id": "evt_…", "event": "<name>", "timestamp": "<RFC 3339 UTC>", "data": {…}}` with
`Content-Type: application/json`, `X-Shoal-Signature: sha256=<hex HMAC-SHA256 of the raw body>`
keyed with the endpoint's secret (the whole `whsec_…` string, UTF-8), `X-Shoal-Event: <name>` and
`X-Shoal-Delivery: <delivery id>`. The body is built once and stored, so every attempt and every
replay sends the same bytes (a rotated secret signs the next attempt with the new secret). The
`id` is the event's: the same for every endpoint and every attempt, so receivers de-duplicate on
it. Any 2xx answer is success; anything else (3xx included: redirects are not followed), a
timeout or a connection error is a failed attempt.

**Catalogue** (`catalogue.EVENTS`; `data` is snake_case JSON, ids only, states and channels by
their PRODUCT.md names, money in integer cents):

- `campaign.<state>` from `campaign.state_changed` (the new state, lower-cased): `scheduled`,
  `draft`, `running`, `paused`, `paused_error`, `paused_balance`, `completed`,
  `completed_partial`, `archived`. Data: `campaign_id`, `run_id` (or null), `from_state`,
  `to_state`, `actor`, `reason`.
- Receipts (`message.<status>`): `message.delivered`, `message.failed`, `message.bounced`;
  opens and clicks are `email.opened` / `email.clicked` on EMAIL and `message.opened` /
  `message.clicked` on RCS or SMS. Data: `message_id` (the provider's), `channel`,
  `contact_id`, `campaign_id`, `run_id`, `node_id` (each null when unknown), `provider`,
  `error` (or null).
- `consent.updated` from `contact.consent_updated` (a `ContactEvent` whose properties carry
  `channel`, `message_type`, `status`, `source`). Data: `contact_id`, `channel`, `message_type`,
  `status`, `source`.
- `billing.balance_low`: `free_cents`, `threshold_cents`. `billing.balance_exhausted`:
  `free_cents`, `campaign_ids`. `billing.auto_reload_succeeded`: `amount_cents`.
  `billing.auto_reload_failed`: `amount_cents`, `error`. (Same names on the bus.)
- `webhook.test`, sent by `POST /v1/webhooks/{id}/test` only (not subscribable): `endpoint_id`,
  `message`.

Run progress, provider breaker changes and the other contact events are not customer events.
The event id is `evt_` + a hash of the subject and the message content, so an event published
twice (whatever its Nats-Msg-Id) or delivered twice is one event. The envelope's `timestamp` is
when the event happened (the message's `time`). An endpoint receives events of its workspace
that happened after it was created, when it subscribed to their name or to `*`.

**Tables** (the gateway's database, migration `d706d74e8327`):
- `webhook_endpoints`: id (`wh_…`), workspace, url, description, events (space separated or
  `*`), enabled, secret (in the clear: signing needs it; the API shows it once), timestamps.
- `webhook_deliveries`: id (`whd_…`, sortable by creation), workspace, endpoint, event id and
  name, the body, state (`pending` | `delivered` | `failed`), attempts (all), replays,
  round_attempts (since the last replay), next_attempt_at, leased_until + lease_token,
  last_attempt_at / last_status_code / last_error, delivered_at. Unique (endpoint_id,
  event_id); a partial index on next_attempt_at of the pending rows finds due work.
- `webhook_attempts`: one row per POST: number (1-based over the delivery's life), replay round,
  started_at, duration_ms, status_code, error, succeeded.

**Durability.** The consumer (`gateway-webhooks`, durable pull, explicit ack) inserts the
deliveries of a batch in one transaction and acks after the commit; a crash before the commit
redelivers the batch, after it the unique key absorbs the redelivery. Deliveries live in the
database, so a restart loses nothing: pending rows are picked up by whichever process polls.

**Leases.** `store.claim` leases due rows with one UPDATE … WHERE state = 'pending' AND
next_attempt_at <= now AND (leased_until IS NULL OR leased_until < now) … RETURNING, setting
`leased_until` = now + `webhook_lease_seconds` and a fresh `lease_token`; on PostgreSQL the row
pick also skips rows another replica is locking. The result of an attempt is written only while
the token still matches, so a process whose lease ran out cannot overwrite its successor. The
lease must outlive the request timeout (checked at start). Delivery is at least once: a crash
between the receiver's 2xx and our commit repeats that POST after the lease expires.

**Schedule.** `SHOAL_GATEWAY_WEBHOOK_RETRY_SCHEDULE` (default `0,60,300,3600,86400`): the first
entry is the wait before attempt 1, each next one the wait after a failed attempt (plus up to
10 % jitter); its length is the attempt limit (5). After the last failed attempt the delivery is
`failed`. A replay (failed or delivered; 409 while pending) starts a new round of the same
schedule, due now. Deliveries to a disabled endpoint wait (they go once it is enabled again);
deleting an endpoint deletes its deliveries. Finished deliveries older than
`SHOAL_GATEWAY_WEBHOOK_RETENTION_DAYS` (30) are pruned.
"""

from gateway.webhooks.dispatcher import Dispatcher

__all__ = ["Dispatcher"]
