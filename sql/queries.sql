-- Named statements issued by the Python package. Each block starts with
-- "-- name --" and a one-line description; edm_sched/sqlfiles.py loads them.
-- Rules that must hold across dispatchers live in the SQL functions of
-- sql/migrations/, never here.

-- migration_lock --
-- Serialise concurrent migration runners (session-level advisory lock).
SELECT pg_advisory_lock(%s)

-- migration_unlock --
-- Release the migration lock.
SELECT pg_advisory_unlock(%s)

-- migration_schema_owner --
-- Owner of schema edm, the current role, and whether the current role may act as the owner.
SELECT n.nspowner::regrole::text, current_user::text,
       pg_has_role(current_user, n.nspowner, 'USAGE')
FROM pg_namespace n WHERE n.nspname = 'edm'

-- migration_bootstrap --
-- Create the schema and the table of applied migrations when missing.
CREATE SCHEMA IF NOT EXISTS edm;
COMMENT ON SCHEMA edm IS 'edm-sched: fair, rate-limited, crash-safe scheduling of email sends. See docs/operations.md.';
CREATE TABLE IF NOT EXISTS edm.schema_migrations (
  version    integer PRIMARY KEY,
  name       text NOT NULL,
  checksum   text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE edm.schema_migrations IS 'Migrations applied to this database, with the SHA-256 of each file as applied.';
COMMENT ON COLUMN edm.schema_migrations.version IS 'Number of the migration file (sql/migrations/NNNN_name.sql).';
COMMENT ON COLUMN edm.schema_migrations.name IS 'Name part of the migration file.';
COMMENT ON COLUMN edm.schema_migrations.checksum IS 'SHA-256 of the file when applied; an edited file is refused.';
COMMENT ON COLUMN edm.schema_migrations.applied_at IS 'When the migration was applied.';

-- migration_applied --
-- Applied migrations and their checksums.
SELECT version, checksum FROM edm.schema_migrations ORDER BY version

-- migration_record --
-- Record one applied migration.
INSERT INTO edm.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)

-- migration_table_exists --
-- Whether the table of applied migrations exists.
SELECT to_regclass('edm.schema_migrations') IS NOT NULL

-- migration_current --
-- Highest applied migration.
SELECT max(version) FROM edm.schema_migrations

-- stage_recipients_create --
-- Session-temporary staging table for an explicit recipient list (filled by COPY).
CREATE TEMP TABLE IF NOT EXISTS edm_stage_recipients (ord bigint, email text, vars jsonb) ON COMMIT DROP

-- stage_share --
-- Let the SECURITY DEFINER functions read this session's staging table.
SELECT edm.share_staged(%s)

-- set_actor --
-- Name the application user behind this transaction's changes (edm.audit_log.actor).
SELECT set_config('edm.actor', %s, true)

-- stage_recipients_copy --
-- COPY target of explicit recipient lists.
COPY edm_stage_recipients (ord, email, vars) FROM STDIN

-- stage_recipients_report --
-- Per-address report of invalid recipients in the staged list.
SELECT ord, email, edm.email_problem(email) FROM edm_stage_recipients
WHERE edm.email_problem(email) IS NOT NULL ORDER BY ord

-- create_task_from_staged --
-- Create a task from the staged list (dedupe, suppressions, quota) in one transaction.
SELECT task_id, recipients, invalid, duplicates, suppressed
FROM edm.create_task_from_staged(%(user_id)s, %(name)s, %(templates)s, %(priority)s,
                                 %(scheduled_at)s, %(skip_invalid)s)

-- create_task_from_rule --
-- Create an expanding task from a tag rule and reserve quota for its matches.
SELECT task_id, recipients
FROM edm.create_task_from_rule(%(user_id)s, %(name)s, %(templates)s, %(rule)s, %(priority)s,
                               %(scheduled_at)s)

-- expand_task --
-- Expand the next chunk of a tag-rule task (own transaction per call).
SELECT added, done FROM edm.expand_task(%s, %s)

-- stage_contacts_create --
-- Session-temporary staging table for contact upserts (filled by COPY).
CREATE TEMP TABLE IF NOT EXISTS edm_stage_contacts
  (ord bigint, email text, attributes jsonb, tags text[], unsubscribed boolean) ON COMMIT DROP

-- stage_contacts_copy --
-- COPY target of contact upserts.
COPY edm_stage_contacts (ord, email, attributes, tags, unsubscribed) FROM STDIN

-- merge_staged_contacts --
-- Merge the staged contacts into edm.contacts.
SELECT inserted, updated FROM edm.merge_staged_contacts(%s)

-- upsert_user --
-- Create a user or update its display name.
SELECT edm.upsert_user(%s, %s, %s)

-- set_user_quota --
-- Change a user's quota.
SELECT edm.set_user_quota(%s, %s)

-- get_user --
-- A user's quota state.
SELECT user_id, display_name, quota_limit, quota_used, created_at FROM edm.users WHERE user_id = %s

-- create_service --
-- Add a sending account.
SELECT edm.create_service(%(name)s, %(from_addresses)s, %(interval_ms)s, %(daily_quota)s,
                          %(transport)s, %(settings)s, %(credential_ref)s, %(quota_tz)s, %(enabled)s)

-- update_service --
-- Change some fields of a sending account.
SELECT edm.update_service(%(service_id)s, %(name)s, %(from_addresses)s, %(interval_ms)s,
                          %(daily_quota)s, %(settings)s, %(credential_ref)s, %(quota_tz)s,
                          %(enabled)s)

-- get_service --
-- One sending account as the host sees it.
SELECT service_id, name, transport, settings, credential_ref, from_addresses, interval_ms,
       daily_quota, quota_tz, enabled, health, nullif(next_available_at, '-infinity') AS next_available_at, sent_today, quota_day,
       total_sent, total_failed, success_rate, avg_response_ms
FROM edm.services WHERE service_id = %s

-- grant_service --
-- Let a user send through a service.
SELECT edm.grant_service(%s, %s, %s)

-- revoke_service --
-- Take a service away from a user.
SELECT edm.revoke_service(%s, %s)

-- set_contact_tags --
-- Add and remove tags on contacts.
SELECT edm.set_contact_tags(%s, %s, %s, %s)

-- delete_tag --
-- Delete a tag everywhere for a user.
SELECT edm.delete_tag(%s, %s)

-- add_suppression --
-- Suppress an address.
SELECT edm.add_suppression(%s, %s, %s)

-- remove_suppression --
-- Lift a suppression.
SELECT edm.remove_suppression(%s, %s)

-- pause_task --
-- Pause a task.
SELECT edm.pause_task(%s, %s)

-- resume_task --
-- Resume a paused task.
SELECT edm.resume_task(%s, %s)

-- cancel_task --
-- Cancel a task, refunding unsent quota.
SELECT edm.cancel_task(%s, %s)

-- get_task --
-- A task's status and counters, scoped to a user when one is given.
SELECT task_id, user_id, name, status, priority, scheduled_at, total_count, pending_count,
       leased_count, sent_count, failed_count, cancelled_count, first_claimed_at,
       last_activity_at, started_at, finished_at, created_at, error
FROM edm.tasks WHERE task_id = %(task_id)s AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s)

-- list_tasks --
-- A user's tasks, newest first.
SELECT task_id, user_id, name, status, priority, scheduled_at, total_count, pending_count,
       leased_count, sent_count, failed_count, cancelled_count, first_claimed_at,
       last_activity_at, started_at, finished_at, created_at, error
FROM edm.tasks WHERE user_id = %s ORDER BY task_id DESC LIMIT %s

-- claim --
-- Claim a batch: at most one subtask per ready service (the rules are in edm.claim).
SELECT subtask_id, task_id, user_id, service_id, email, contact_id, template_idx, vars, attempt,
       leased_at, lease_expires_at
FROM edm.claim(%s, %s, %s, %s)

-- claim_v2 --
-- Claim a batch with slots: up to per-service slots of each ready service. db_clock is the
-- server's clock as the rows leave it: the dispatcher maps slots onto its own clock with it.
SELECT subtask_id, task_id, user_id, service_id, email, contact_id, template_idx, vars, attempt,
       send_at, lease_expires_at, clock_timestamp() AS db_clock
FROM edm.claim_v2(%s, %s, %s, %s, %s, %s, %s)

-- renew_leases --
-- Keep this dispatcher's leases (and its holds of their services) alive while sends wait.
SELECT subtask_id, lease_expires_at, clock_timestamp() AS db_clock
FROM edm.renew_leases(%s, %s, %s, %s)

-- release_holds --
-- This dispatcher stops: other dispatchers may claim its services at once.
SELECT edm.release_holds(%s)

-- next_wakeup_v2 --
-- Seconds until this dispatcher could next claim something or a lease expires (NULL: none).
SELECT extract(epoch FROM edm.next_wakeup_v2(%s, %s, %s) - coalesce(%s, now()))::float8

-- complete --
-- Record a batch of outcomes, fenced by the lease.
SELECT subtask_id, accepted, status, reason FROM edm.complete(%s, %s, %s, %s, %s, %s, %s, %s)

-- next_wakeup --
-- Seconds until the earliest moment a claim or lease expiry could have work (NULL: none).
SELECT extract(epoch FROM edm.next_wakeup(%s) - coalesce(%s, now()))::float8

-- dispatch_templates --
-- Templates of some tasks, for rendering.
SELECT task_id, template_idx, subject, body_text, body_html, from_name, reply_to, headers,
       list_unsubscribe
FROM edm.templates WHERE task_id = ANY(%s)

-- dispatch_contacts --
-- Attributes of some contacts, for rendering.
SELECT contact_id, attributes FROM edm.contacts WHERE contact_id = ANY(%s)

-- dispatch_services --
-- Transport settings of some services (no secrets are stored), and the (emission
-- interval, tolerance) in ms of each rate limit, for the lane's pacing (GCRA).
SELECT s.service_id, s.name, s.transport, s.settings, s.credential_ref, s.from_addresses,
       s.interval_ms,
       ARRAY(SELECT ARRAY[l.window_ms::float8 / l.max_count,
                          (l.burst - 1) * l.window_ms::float8 / l.max_count]
             FROM edm.service_limits l
             WHERE l.service_id = s.service_id AND l.kind = 'rate' AND l.max_count > 0
             ORDER BY l.name) AS pacers
FROM edm.services s WHERE s.service_id = ANY(%s)

-- dispatcher_register --
-- Record this dispatcher process.
INSERT INTO edm.dispatchers (dispatcher_id, hostname, pid) VALUES (%s, %s, %s)
ON CONFLICT (dispatcher_id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL

-- dispatcher_heartbeat --
-- This dispatcher is alive.
UPDATE edm.dispatchers SET heartbeat_at = now() WHERE dispatcher_id = %s

-- dispatcher_stopped --
-- This dispatcher stopped cleanly.
UPDATE edm.dispatchers SET stopped_at = now(), heartbeat_at = now() WHERE dispatcher_id = %s

-- listen --
-- Wake-ups (new or resumed work, services) and config reloads.
LISTEN edm_wakeup; LISTEN edm_config

-- sweep_try_lead --
-- Become the sweep leader if nobody is (session advisory lock, released if the session dies).
SELECT pg_try_advisory_lock(%s)

-- sweep_expire_leases --
-- Return expired leases to pending (recording the uncertain outcomes).
SELECT edm.expire_leases(%s)

-- sweep_run --
-- One round of every sweep; returns a JSON report.
SELECT edm.run_sweeps(%s)

-- sweep_take_alerts --
-- Alerts not yet handed to the host callback (marked as handed over).
SELECT alert_id, raised_at, kind, severity, task_id, service_id, user_id, message
FROM edm.take_alerts(100)

-- config_all --
-- Every config value.
SELECT key, value FROM edm.config

-- demo_tasks --
-- Demo progress: its tasks.
SELECT task_id, user_id, name, status, total_count, sent_count, failed_count
FROM edm.tasks WHERE task_id = ANY(%s) ORDER BY task_id

-- demo_services --
-- Demo progress: its services and their readiness.
SELECT s.service_id, s.name, s.interval_ms, s.daily_quota, edm.service_sent_today(s),
       CASE WHEN NOT s.enabled THEN 'disabled'
            WHEN s.quota_exhausted_until > now() THEN 'quota exhausted'
            WHEN s.backoff_until > now() THEN 'backing off'
            WHEN edm.service_is_ready(s) THEN 'ready' ELSE 'waiting interval' END
FROM edm.services s WHERE s.service_id = ANY(%s) ORDER BY s.service_id

-- demo_task_owners --
-- Owner of each demo task.
SELECT task_id, user_id FROM edm.tasks WHERE task_id = ANY(%s)

-- demo_interval_violations --
-- Send starts on one service closer together than its interval (I2), from the history.
SELECT count(*) FROM (
  SELECT e.started_at - lag(e.started_at) OVER (PARTITION BY e.service_id ORDER BY e.started_at)
           AS gap, s.interval_ms
  FROM edm.send_events e JOIN edm.services s ON s.service_id = e.service_id
  WHERE e.service_id = ANY(%s) AND e.kind <> 'late_completion') x
WHERE x.gap < x.interval_ms * interval '1 millisecond'

-- demo_quota_violations --
-- Service quota days with more send starts than the daily quota (I3), from the history.
SELECT count(*) FROM (
  SELECT e.service_id, (e.started_at AT TIME ZONE s.quota_tz)::date, s.daily_quota, count(*) AS n
  FROM edm.send_events e JOIN edm.services s ON s.service_id = e.service_id
  WHERE e.service_id = ANY(%s) AND e.kind IN ('sent', 'retry', 'failed', 'lease_expired')
  GROUP BY 1, 2, 3) x
WHERE x.n > x.daily_quota

-- demo_first_waits --
-- First-send wait of each demo task, in seconds.
SELECT user_id, name, extract(epoch FROM first_claimed_at - scheduled_at)::float8
FROM edm.tasks WHERE task_id = ANY(%s) ORDER BY task_id

-- demo_sent --
-- Subtasks the database records as sent for the demo's tasks.
SELECT coalesce(sum(sent_count), 0) FROM edm.tasks WHERE task_id = ANY(%s)

-- config_get --
-- One config entry.
SELECT key, value, default_value, category, value_type, min_value, max_value, allowed_values,
       unit, description, updated_at, updated_by
FROM edm.config WHERE key = %s

-- config_renamed --
-- The name now of a setting a migration renamed (NULL: not an old name).
SELECT key FROM edm.config_renamed WHERE old_key = %s

-- config_list --
-- Every config entry.
SELECT key, value, default_value, category, value_type, min_value, max_value, allowed_values,
       unit, description, updated_at, updated_by
FROM edm.config ORDER BY key

-- config_set --
-- Change a config value (checked in SQL, dispatchers notified); false when set by an old name.
SELECT edm.config_set(%s, %s, %s), EXISTS (SELECT FROM edm.config c WHERE c.key = %s)

-- system_health --
-- The one-row system health view.
SELECT services_total, services_enabled, services_available, services_active_last_minute,
       pending_subtasks, leased_subtasks, active_tasks, sent_last_minute, error_rate_last_hour,
       open_alerts, dispatchers_alive
FROM edm.system_health

-- task_progress --
-- Progress of live and recent tasks.
SELECT task_id, user_id, name, status, priority, scheduled_at, total, sent, pending, leased, failed,
       cancelled, progress_pct, first_send_wait_s, sends_per_s, eta_s, last_activity_at,
       stuck_since, sent_pct, outcome
FROM edm.task_progress
WHERE status IN ('expanding', 'scheduled', 'sending', 'paused')
   OR last_activity_at > now() - interval '1 hour'
ORDER BY task_id DESC LIMIT %s

-- service_status --
-- State of every service.
SELECT service_id, name, transport, enabled, state, next_available_at, interval_ms, daily_quota,
       sent_today, quota_used_pct, sent_last_hour, success_rate, avg_response_ms, health,
       consecutive_failures, backoff_until, last_error, total_sent, total_failed
FROM edm.service_status ORDER BY service_id LIMIT %s

-- task_wait_reasons --
-- Why waiting tasks wait.
SELECT task_id, user_id, name, status, reason, until FROM edm.task_wait_reasons
ORDER BY task_id LIMIT %s

-- open_alerts --
-- Alerts not resolved.
SELECT alert_id, raised_at, kind, severity, task_id, service_id, user_id, message
FROM edm.alerts WHERE resolved_at IS NULL ORDER BY alert_id DESC LIMIT %s

-- first_waits_since --
-- First-send waits (seconds) of tasks first claimed in a time window, for the metrics histogram.
SELECT extract(epoch FROM first_claimed_at - scheduled_at)::float8
FROM edm.tasks WHERE first_claimed_at > %s AND first_claimed_at <= %s

-- host_tx_begin --
-- Open the host's pending transaction (conn= on an idle non-autocommit connection) so that
-- the call's savepoint is one, and not a transaction of its own that would commit.
SELECT 1

-- stage_recipients_clear --
-- Empty the recipient staging table: a host transaction (conn=) may create several tasks.
TRUNCATE edm_stage_recipients

-- stage_contacts_clear --
-- Empty the contact staging table: a host transaction (conn=) may import several batches.
TRUNCATE edm_stage_contacts

-- set_service_limits --
-- Replace the extra limits of a service (edm.service_limits); unchanged ones keep their state.
SELECT edm.set_service_limits(%s, %s)

-- service_limits --
-- Every limit of a service, built-in and extra, with use and headroom.
SELECT limit_name, kind, max_count, window_ms, burst, used, headroom, next_free_at
FROM edm.service_limit_status WHERE service_id = %s ORDER BY limit_name

-- db_clock --
-- The server's clock, read by a dispatcher at start (a few times) to seed its clock map.
SELECT clock_timestamp()

-- migration_can_harden --
-- Whether edm.harden_functions exists yet (created by migration 0006).
SELECT to_regprocedure('edm.harden_functions()') IS NOT NULL

-- migration_harden --
-- Re-apply SECURITY DEFINER, the pinned search_path and the PUBLIC revoke to every writing
-- function (replacing a function loses them); run after each migration.
SELECT edm.harden_functions()

-- unsubscribe --
-- Unsubscribe an address from a user's mail (contact, suppression, pending subtasks).
SELECT contact_updated, suppressed, cancelled FROM edm.unsubscribe(%s, %s, %s, %s)

-- record_feedback --
-- Record one delivery event found by Message-ID (suppressions follow in SQL).
SELECT event_id, subtask_id, duplicate, suppressed, cancelled
FROM edm.record_feedback(%(kind)s, %(message_id)s, %(recipient)s, %(source)s, %(raw)s,
                         %(detail)s, %(event_key)s, %(occurred_at)s, %(now)s)

-- sweep_reputation --
-- The reputation breaker (rate-limited in SQL to reputation.check_interval).
SELECT edm.check_reputation(%s, %s)

-- reputation_status --
-- Bounce and complaint rates per service and user, and pause reasons.
SELECT subject, service_id, user_id, window_start, sends, hard_bounces, complaints, bounce_pct,
       complaint_pct, judged, paused_reason
FROM edm.reputation_rates(%s) ORDER BY subject, service_id, user_id

-- reputation_resume_service --
-- Re-enable a service the reputation breaker disabled.
SELECT edm.reputation_resume_service(%s, %s)

-- reputation_resume_user --
-- Resume a user the reputation breaker paused.
SELECT edm.reputation_resume_user(%s, %s)

-- report_pace --
-- Lanes running late: the next slot of each service moves to when its next send can start.
SELECT edm.report_pace(%s, %s, %s)

-- release_idle_holds --
-- Services whose lanes ran empty while this dispatcher has no room to claim: others may take them.
SELECT edm.release_holds(%s, %s)

-- sites_of --
-- The site of each queued recipient, to hand back those of a (service, site) pair just suspended.
SELECT edm.sites_of(%s::text[])

-- sites_set_domains --
-- Define a destination site and map domains to it (edm.set_site_domains).
SELECT edm.set_site_domains(%s, %s::text[], %s)

-- sites_list --
-- Every destination site with its number of mapped domains.
SELECT s.site, s.description, s.created_at,
       (SELECT count(*) FROM edm.site_domains d WHERE d.site = s.site)::integer AS domains
FROM edm.sites s ORDER BY s.site

-- sites_domains --
-- The domains mapped to one site (empty when the site is unknown or has none).
SELECT d.domain, d.site, d.source, d.resolved_at
FROM edm.site_domains d WHERE d.site = %s ORDER BY d.domain

-- sites_exists --
-- Whether a destination site is defined.
SELECT EXISTS (SELECT 1 FROM edm.sites s WHERE s.site = %s)

-- sites_suspend --
-- Suspend a (service, site) pair until a time (a time already past lifts it).
SELECT edm.suspend_site(%s, %s, %s, %s)

-- sites_unmapped_of_task --
-- The recipient domains of a task that no site maps yet: what the host's resolver hook answers.
SELECT u.domain
FROM edm.unmapped_domains(ARRAY(SELECT DISTINCT edm.email_domain(st.email)
                                FROM edm.subtasks st WHERE st.task_id = %s)) AS u(domain)

-- sites_unmapped --
-- Those of some domains that no site maps yet.
SELECT u.domain FROM edm.unmapped_domains(%s::text[]) AS u(domain)

-- sites_cache --
-- Cache the resolver hook's answers (never overriding shipped or admin mappings).
SELECT edm.cache_site_domains(%s::text[], %s::text[])

-- warmup_set --
-- Put a service on a warm-up ramp (NULL ramp: end it); returns the ceiling in force.
SELECT edm.set_service_warmup(%s, %s::integer[], %s::date)

-- warmup_status --
-- Where a service's warm-up stands (no row when it has none).
SELECT service_id, service_name, started_on, day, days, state, ceiling_today, ceiling_in_force,
       used_today, ceiling_tomorrow, final_ceiling, next_day_at, ramp
FROM edm.service_warmup_status WHERE service_id = %s

-- warmup_ramp --
-- A growing warm-up ramp from a start to a full daily volume (edm.warmup_ramp).
SELECT edm.warmup_ramp(%s::integer, %s::integer, %s::numeric)
-- set_global_limits --
-- Replace the global limits (edm.shaping_limits, scope global); unchanged ones keep their state.
SELECT edm.set_global_limits(%s)

-- set_site_limits --
-- Replace the limits of a site across all services (service NULL) or of one service to it.
SELECT edm.set_site_limits(%s, %s, %s)

-- set_user_limits --
-- Replace the limits of a user (a tenant's plan).
SELECT edm.set_user_limits(%s, %s)

-- set_task_limits --
-- Replace the limits of a task (a campaign's maximum rate).
SELECT edm.set_task_limits(%s, %s)

-- set_task_transactional --
-- Put a task in the transactional lane (true) or the bulk lane (false).
SELECT edm.set_task_transactional(%s, %s)

-- shaping_limits --
-- Every shaping limit with its use, headroom and next free time (optionally of one scope).
SELECT scope, site, service_id, user_id, task_id, limit_name, kind, max_count, window_ms, burst,
       used, headroom, next_free_at
FROM edm.shaping_limit_status
WHERE %(scope)s::text IS NULL OR scope = %(scope)s::text
ORDER BY scope, site NULLS FIRST, service_id NULLS FIRST, user_id NULLS FIRST,
         task_id NULLS FIRST, limit_name
-- reply_rules --
-- Every reply rule, in the order edm.complete tries them (reply_rules.py).
SELECT rule_id, name, priority, enabled, source, site, smtp_code, enhanced_code, pattern,
       transport_code, action, duration_s, escalation_factor, max_duration_s, reset_after_s,
       description, updated_at
FROM edm.reply_rules ORDER BY priority, rule_id

-- set_reply_rule --
-- Create or replace a reply rule by name; returns its id.
SELECT edm.set_reply_rule(%(name)s, %(action)s, %(smtp_code)s, %(enhanced_code)s, %(pattern)s,
                          %(transport_code)s, %(site)s, %(priority)s, %(duration_s)s,
                          %(escalation_factor)s, %(max_duration_s)s, %(reset_after_s)s,
                          %(enabled)s, %(description)s)

-- enable_reply_rule --
-- Enable or disable a reply rule by name.
SELECT edm.enable_reply_rule(%s, %s)

-- delete_reply_rule --
-- Delete a reply rule by name.
SELECT edm.delete_reply_rule(%s)

-- match_reply_rule --
-- The name of the rule edm.complete would apply to a reply (or NULL).
SELECT r.name FROM edm.reply_rules r WHERE r.rule_id = edm.match_reply_rule(%s, %s, %s)

-- site_suspensions --
-- (service, site) suspensions with the rule and reply that set them; optionally one service, in force only.
SELECT service_id, service_name, site, until, level, in_force, created_at, reason, rule_id,
       rule_name, last_reply_at, last_code, last_reply
FROM edm.site_suspension_status
WHERE (%(service_id)s::bigint IS NULL OR service_id = %(service_id)s)
  AND (NOT %(in_force)s OR in_force)
ORDER BY service_id, site

-- lift_site_suspension --
-- End the suspension of a (service, site) pair now and forget its escalation level.
SELECT edm.lift_site_suspension(%s, %s)

-- shaping_actions --
-- Latest reply-rule applications, newest first; optionally one service.
SELECT action_id, at, rule_id, rule_name, service_id, site, subtask_id, action, until, level,
       code, reply
FROM edm.shaping_actions
WHERE (%(service_id)s::bigint IS NULL OR service_id = %(service_id)s)
ORDER BY at DESC, action_id DESC
LIMIT %(limit)s
