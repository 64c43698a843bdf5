-- 0031_slot_lead_within_horizon: an idle paced service's first slot never
-- lies past the claim's own horizon (issue 14, point 2).
--
-- Since 0008 an idle paced service (an interval or an extra limit) gets its
-- first slot queue.slot_lead_ms after the claim, so that the dispatcher has
-- rendered the message and opened its connection by then. The lead is
-- counted from the server's clock as the call begins (clock_timestamp()), the
-- horizon from now() (the start of the transaction) plus the lookahead. Two
-- cases put the lead past the horizon, and the claim then took the service
-- for one blocked by an extra limit: it gave it no slot and kept it out of the
-- ready set until then.
--
-- * A lookahead no longer than the lead. The lead is capped at the lookahead,
--   so lead and horizon are the same distance from two clocks, and
--   clock_timestamp() is always past now(). edm.claim (lookahead 0: "every
--   slot is now") never claimed a paced service on the real clock, and a
--   dispatcher with queue.slot_lookahead_ms <= queue.slot_lead_ms never
--   claimed an idle one. Tests that set p_now could not see it: there both
--   are counted from p_now.
-- * A claim called more than (lookahead - lead) after its transaction
--   began (150 ms by default): a host's claim inside a longer transaction.
--   The dispatcher claims in a transaction of its own, so with the default
--   settings its claims were not affected.
--
-- The lead now ends at the horizon at the latest: such a slot is shorter
-- ahead of the send than the lead asks, but it is one the claim may give.
-- With p_now set nothing changes (the lead was already within the horizon).

SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$  v_lead_at := CASE WHEN p_now IS NULL THEN clock_timestamp() ELSE v_now END
               + least(coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms')),
                       edm.config_int('queue.slot_lead_ms')) * interval '1 millisecond';$p$,
$p$  v_lead_at := CASE WHEN p_now IS NULL THEN clock_timestamp() ELSE v_now END
               + least(coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms')),
                       edm.config_int('queue.slot_lead_ms')) * interval '1 millisecond';
  -- (0031) and no later than the horizon: counted from the claim's start,
  -- which the server's clock has passed
  v_lead_at := least(v_lead_at, v_horizon);$p$]],
  '0031_slot_lead_within_horizon');
