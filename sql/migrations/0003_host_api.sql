-- 0003_host_api.sql: what the host backend calls — users, services, grants,
-- contacts, suppressions, task creation with set-based expansion, and the
-- task lifecycle (pause, resume, cancel).
--
-- Every function that takes p_user_id as a scope treats an object of another
-- user exactly like a missing one (ED001): a tenant cannot probe another
-- tenant's ids.

-- ---------------------------------------------------------------------------
-- Small helpers
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.email_problem(p_email text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
  WHEN p_email IS NULL OR btrim(p_email) = '' THEN 'empty address'
  WHEN length(p_email) > 254 THEN 'longer than 254 characters'
  WHEN p_email ~ '[[:cntrl:]]' THEN 'contains control characters (CR, LF, NUL...)'
  -- Non-breaking and zero-width spaces, soft hyphens, bidi controls, BOM:
  -- invisible, not trimmed by normalize_email, so 'a@b.com' followed by a
  -- pasted U+00A0 would be a second recipient for the same mailbox.
  WHEN p_email ~ '[\u00a0\u00ad\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\ufeff]'
    THEN 'contains invisible or non-breaking space characters'
  WHEN position('@' IN p_email) = 0 THEN 'missing @'
  WHEN NOT edm.is_valid_email(edm.normalize_email(p_email)) THEN 'not a valid address'
END;
COMMENT ON FUNCTION edm.email_problem(text) IS
  'Why p_email is not acceptable as a recipient, or NULL when it is: empty, too long, control characters, invisible or non-breaking space characters, no @, or not a valid address (edm.is_valid_email after normalisation). Letters outside ASCII are accepted (SMTPUTF8 addresses). Used for the per-address report of task creation and contact import.';

CREATE FUNCTION edm.require_user(p_user_id text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM edm.users u WHERE u.user_id = p_user_id) THEN
    RAISE EXCEPTION 'unknown user %', p_user_id USING ERRCODE = 'ED001';
  END IF;
END;
$$;
COMMENT ON FUNCTION edm.require_user(text) IS 'Raises ED001 (not found) unless user p_user_id exists.';

-- ---------------------------------------------------------------------------
-- Users
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.upsert_user(p_user_id text, p_display_name text DEFAULT NULL,
                                p_quota_limit bigint DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  INSERT INTO edm.users (user_id, display_name, quota_limit)
  VALUES (p_user_id, p_display_name, p_quota_limit)
  ON CONFLICT (user_id) DO UPDATE
    SET display_name = coalesce(EXCLUDED.display_name, edm.users.display_name);
END;
$$;
COMMENT ON FUNCTION edm.upsert_user(text, text, bigint) IS
  'Creates user p_user_id (the host''s tenant id) or updates its display name. The quota is only set on creation; change it with edm.set_user_quota().';

CREATE FUNCTION edm.set_user_quota(p_user_id text, p_quota_limit bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_used bigint;
BEGIN
  IF p_quota_limit < 0 THEN
    RAISE EXCEPTION 'quota must be >= 0 or NULL (unlimited), got %', p_quota_limit
      USING ERRCODE = 'ED005';
  END IF;
  SELECT u.quota_used INTO v_used FROM edm.users u WHERE u.user_id = p_user_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown user %', p_user_id USING ERRCODE = 'ED001';
  END IF;
  IF p_quota_limit < v_used THEN
    RAISE EXCEPTION 'user % already has % recipients reserved; the quota cannot go below that',
      p_user_id, v_used USING ERRCODE = 'ED002';
  END IF;
  UPDATE edm.users SET quota_limit = p_quota_limit WHERE user_id = p_user_id;
END;
$$;
COMMENT ON FUNCTION edm.set_user_quota(text, bigint) IS
  'Sets the most recipients user p_user_id may have reserved (NULL = unlimited). Refused (ED002) below what is already reserved.';

-- ---------------------------------------------------------------------------
-- Services and grants
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.create_service(
  p_name text, p_from_addresses text[], p_interval_ms bigint, p_daily_quota integer,
  p_transport text DEFAULT 'smtp', p_settings jsonb DEFAULT '{}'::jsonb,
  p_credential_ref text DEFAULT NULL, p_quota_tz text DEFAULT 'UTC',
  p_enabled boolean DEFAULT true)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
  v_id bigint;
  v_bad text;
BEGIN
  SELECT a INTO v_bad FROM unnest(p_from_addresses) a WHERE edm.email_problem(a) IS NOT NULL LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'invalid sender address %: %', quote_literal(v_bad), edm.email_problem(v_bad)
      USING ERRCODE = 'ED005';
  END IF;
  IF NOT edm.is_valid_timezone(p_quota_tz) THEN
    RAISE EXCEPTION 'unknown time zone %', quote_literal(p_quota_tz) USING ERRCODE = 'ED005';
  END IF;
  INSERT INTO edm.services (name, transport, settings, credential_ref, from_addresses,
                            interval_ms, daily_quota, quota_tz, enabled)
  VALUES (p_name, p_transport, p_settings, p_credential_ref, p_from_addresses,
          p_interval_ms, p_daily_quota, p_quota_tz, p_enabled)
  RETURNING service_id INTO v_id;
  PERFORM pg_notify('edm_wakeup', 'service:' || v_id);
  RETURN v_id;
END;
$$;
COMMENT ON FUNCTION edm.create_service(text, text[], bigint, integer, text, jsonb, text, text, boolean) IS
  'Adds a sending account and returns its id. Settings must not contain secrets (credential_ref names the secret for the host resolver).';

CREATE FUNCTION edm.update_service(
  p_service_id bigint,
  p_name text DEFAULT NULL, p_from_addresses text[] DEFAULT NULL,
  p_interval_ms bigint DEFAULT NULL, p_daily_quota integer DEFAULT NULL,
  p_settings jsonb DEFAULT NULL, p_credential_ref text DEFAULT NULL,
  p_quota_tz text DEFAULT NULL, p_enabled boolean DEFAULT NULL,
  p_now timestamptz DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
BEGIN
  IF p_quota_tz IS NOT NULL AND NOT edm.is_valid_timezone(p_quota_tz) THEN
    RAISE EXCEPTION 'unknown time zone %', quote_literal(p_quota_tz) USING ERRCODE = 'ED005';
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(p_from_addresses) a WHERE edm.email_problem(a) IS NOT NULL) THEN
    RAISE EXCEPTION 'invalid sender address in %', p_from_addresses USING ERRCODE = 'ED005';
  END IF;
  UPDATE edm.services s SET
    name = coalesce(p_name, s.name),
    from_addresses = coalesce(p_from_addresses, s.from_addresses),
    interval_ms = coalesce(p_interval_ms, s.interval_ms),
    daily_quota = coalesce(p_daily_quota, s.daily_quota),
    settings = coalesce(p_settings, s.settings),
    credential_ref = coalesce(p_credential_ref, s.credential_ref),
    quota_tz = coalesce(p_quota_tz, s.quota_tz),
    enabled = coalesce(p_enabled, s.enabled),
    -- a changed quota re-decides exhaustion for the current quota day
    quota_exhausted_until =
      CASE WHEN edm.service_sent_today(s, v_now) >= coalesce(p_daily_quota, s.daily_quota)
           THEN edm.service_next_quota_day(coalesce(p_quota_tz, s.quota_tz), v_now) END,
    updated_at = v_now
  WHERE s.service_id = p_service_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
END;
$$;
COMMENT ON FUNCTION edm.update_service(bigint, text, text[], bigint, integer, jsonb, text, text, boolean, timestamptz) IS
  'Changes the given fields of a service (NULL = unchanged). Disabling takes effect for the next claim; enabling wakes dispatchers.';

CREATE FUNCTION edm.grant_service(p_service_id bigint, p_user_id text, p_priority integer DEFAULT 0)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM edm.require_user(p_user_id);
  IF NOT EXISTS (SELECT 1 FROM edm.services s WHERE s.service_id = p_service_id) THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  INSERT INTO edm.grants (service_id, user_id, priority) VALUES (p_service_id, p_user_id, p_priority)
  ON CONFLICT (service_id, user_id) DO UPDATE SET priority = EXCLUDED.priority;
  PERFORM pg_notify('edm_wakeup', 'grant:' || p_service_id);
END;
$$;
COMMENT ON FUNCTION edm.grant_service(bigint, text, integer) IS
  'Lets user p_user_id send through service p_service_id (or changes the grant''s priority).';

CREATE FUNCTION edm.revoke_service(p_service_id bigint, p_user_id text)
RETURNS boolean
LANGUAGE sql
BEGIN ATOMIC
  WITH d AS (DELETE FROM edm.grants g WHERE g.service_id = p_service_id AND g.user_id = p_user_id
             RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM d);
END;
COMMENT ON FUNCTION edm.revoke_service(bigint, text) IS
  'Removes a grant; true when one existed. Subtasks already leased through it finish; no new claims use it.';

-- ---------------------------------------------------------------------------
-- Contacts, tags, suppressions
-- ---------------------------------------------------------------------------

-- Contacts arrive by COPY into the session's temporary table
-- edm_stage_contacts(email text, attributes jsonb, tags text[], unsubscribed boolean)
-- (created by the caller, see sql/queries.sql), then this merges them.
CREATE FUNCTION edm.merge_staged_contacts(p_user_id text)
RETURNS TABLE (inserted integer, updated integer)
LANGUAGE plpgsql
AS $$
DECLARE
  v_bad record;
BEGIN
  PERFORM edm.require_user(p_user_id);
  SELECT s.email, edm.email_problem(s.email) AS problem INTO v_bad
  FROM pg_temp.edm_stage_contacts s WHERE edm.email_problem(s.email) IS NOT NULL LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'invalid contact address %: %', quote_literal(v_bad.email), v_bad.problem
      USING ERRCODE = 'ED005';
  END IF;
  RETURN QUERY
  WITH src AS (
    -- the last occurrence of an address wins
    SELECT DISTINCT ON (edm.normalize_email(s.email))
           edm.normalize_email(s.email) AS email, coalesce(s.attributes, '{}'::jsonb) AS attributes,
           coalesce(s.tags, '{}') AS tags, coalesce(s.unsubscribed, false) AS unsubscribed, s.ord
    FROM pg_temp.edm_stage_contacts s
    ORDER BY edm.normalize_email(s.email), s.ord DESC
  ),
  up AS (
    -- in import order, so contact ids (the order of tag-rule expansion)
    -- follow the order the host gave
    INSERT INTO edm.contacts AS c (user_id, email, attributes, tags, unsubscribed)
    SELECT p_user_id, src.email, src.attributes, src.tags, src.unsubscribed FROM src
    ORDER BY src.ord
    ON CONFLICT (user_id, email) DO UPDATE
      SET attributes = c.attributes || EXCLUDED.attributes,
          tags = ARRAY(SELECT DISTINCT x FROM unnest(c.tags || EXCLUDED.tags) x ORDER BY x),
          unsubscribed = c.unsubscribed OR EXCLUDED.unsubscribed,
          updated_at = now()
    RETURNING (xmax = 0) AS is_insert
  )
  SELECT count(*) FILTER (WHERE is_insert)::integer, count(*) FILTER (WHERE NOT is_insert)::integer
  FROM up;
  INSERT INTO edm.tags (user_id, tag)
  SELECT DISTINCT p_user_id, t FROM pg_temp.edm_stage_contacts s, unnest(s.tags) t
  ON CONFLICT DO NOTHING;
END;
$$;
COMMENT ON FUNCTION edm.merge_staged_contacts(text) IS
  'Upserts the contacts COPYed into the session''s temporary table edm_stage_contacts for user p_user_id: attributes merged, tags added, unsubscribes kept. Any invalid address refuses the whole batch (ED005).';

CREATE FUNCTION edm.set_contact_tags(p_user_id text, p_emails text[], p_add text[], p_remove text[])
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  PERFORM edm.require_user(p_user_id);
  UPDATE edm.contacts c
  SET tags = ARRAY(SELECT DISTINCT x FROM unnest(c.tags || coalesce(p_add, '{}')) x
                   WHERE x <> ALL (coalesce(p_remove, '{}')) ORDER BY x),
      updated_at = now()
  WHERE c.user_id = p_user_id
    AND c.email IN (SELECT edm.normalize_email(e) FROM unnest(p_emails) e);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  INSERT INTO edm.tags (user_id, tag) SELECT p_user_id, t FROM unnest(p_add) t ON CONFLICT DO NOTHING;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.set_contact_tags(text, text[], text[], text[]) IS
  'Adds p_add and removes p_remove tags on the given contacts of p_user_id; returns how many contacts changed.';

CREATE FUNCTION edm.delete_tag(p_user_id text, p_tag text)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  UPDATE edm.contacts c SET tags = array_remove(c.tags, p_tag), updated_at = now()
  WHERE c.user_id = p_user_id AND c.tags @> ARRAY[p_tag];
  GET DIAGNOSTICS v_n = ROW_COUNT;
  DELETE FROM edm.tags t WHERE t.user_id = p_user_id AND t.tag = p_tag;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.delete_tag(text, text) IS
  'Deletes tag p_tag of user p_user_id and removes it from every contact; returns how many contacts had it.';

CREATE FUNCTION edm.add_suppression(p_email text, p_reason text DEFAULT 'manual', p_user_id text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  IF edm.email_problem(p_email) IS NOT NULL THEN
    RAISE EXCEPTION 'invalid address %: %', quote_literal(p_email), edm.email_problem(p_email)
      USING ERRCODE = 'ED005';
  END IF;
  IF p_user_id IS NOT NULL THEN
    PERFORM edm.require_user(p_user_id);
  END IF;
  INSERT INTO edm.suppressions (user_id, email, reason)
  VALUES (p_user_id, edm.normalize_email(p_email), p_reason)
  ON CONFLICT (user_id, email) DO UPDATE SET reason = EXCLUDED.reason;
END;
$$;
COMMENT ON FUNCTION edm.add_suppression(text, text, text) IS
  'Suppresses an address for user p_user_id, or for everyone when NULL. Pending subtasks already created still go; new tasks exclude it.';

CREATE FUNCTION edm.remove_suppression(p_email text, p_user_id text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql
BEGIN ATOMIC
  WITH d AS (DELETE FROM edm.suppressions s
             WHERE s.email = edm.normalize_email(p_email) AND s.user_id IS NOT DISTINCT FROM p_user_id
             RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM d);
END;
COMMENT ON FUNCTION edm.remove_suppression(text, text) IS 'Lifts a suppression; true when one existed.';

CREATE FUNCTION edm.is_suppressed(p_user_id text, p_email text)
RETURNS boolean
LANGUAGE sql STABLE
RETURN EXISTS (SELECT 1 FROM edm.suppressions s
               WHERE s.email = p_email AND (s.user_id IS NULL OR s.user_id = p_user_id));
COMMENT ON FUNCTION edm.is_suppressed(text, text) IS
  'True when normalised address p_email is suppressed for user p_user_id (or for everyone). Task creation and expansion write the same predicate out as NOT EXISTS, which the planner turns into an anti-join (a call per contact is far slower).';

-- ---------------------------------------------------------------------------
-- Task creation
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.reserve_quota(p_user_id text, p_n bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_limit bigint;
  v_used bigint;
BEGIN
  UPDATE edm.users u SET quota_used = u.quota_used + p_n
  WHERE u.user_id = p_user_id AND (u.quota_limit IS NULL OR u.quota_used + p_n <= u.quota_limit);
  IF NOT FOUND THEN
    SELECT u.quota_limit, u.quota_used INTO v_limit, v_used FROM edm.users u WHERE u.user_id = p_user_id;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'unknown user %', p_user_id USING ERRCODE = 'ED001';
    END IF;
    RAISE EXCEPTION 'quota exceeded for user %: % recipients requested, % of % left',
      p_user_id, p_n, v_limit - v_used, v_limit
      USING ERRCODE = 'ED002', DETAIL = format('requested=%s available=%s', p_n, v_limit - v_used);
  END IF;
END;
$$;
COMMENT ON FUNCTION edm.reserve_quota(text, bigint) IS
  'Atomically reserves p_n recipients of user p_user_id''s quota, or raises ED002 (quota exceeded) and reserves nothing.';

CREATE FUNCTION edm.new_task(
  p_user_id text, p_name text, p_templates jsonb, p_status text, p_priority integer,
  p_scheduled_at timestamptz, p_rule jsonb)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
  v_task bigint;
  v_n integer := jsonb_array_length(p_templates);
BEGIN
  PERFORM edm.require_user(p_user_id);
  IF v_n IS NULL OR v_n NOT BETWEEN 1 AND 100 THEN
    RAISE EXCEPTION 'a task needs 1 to 100 templates' USING ERRCODE = 'ED005';
  END IF;
  INSERT INTO edm.tasks (user_id, name, status, priority, scheduled_at, recipient_rule, template_count)
  VALUES (p_user_id, p_name, p_status, coalesce(p_priority, 0), coalesce(p_scheduled_at, now()),
          p_rule, v_n)
  RETURNING task_id INTO v_task;
  INSERT INTO edm.templates (task_id, template_idx, subject, body_text, body_html, from_name, reply_to)
  SELECT v_task, (t.ord - 1)::smallint, t.tpl ->> 'subject', t.tpl ->> 'body_text',
         t.tpl ->> 'body_html', t.tpl ->> 'from_name', t.tpl ->> 'reply_to'
  FROM jsonb_array_elements(p_templates) WITH ORDINALITY AS t(tpl, ord);
  RETURN v_task;
END;
$$;
COMMENT ON FUNCTION edm.new_task(text, text, jsonb, text, integer, timestamptz, jsonb) IS
  'Inserts a task row and its templates (a JSON array of {subject, body_text, body_html, from_name, reply_to}). Internal to the create_task_* functions.';

-- Explicit recipient lists arrive by COPY into the session's temporary table
-- edm_stage_recipients(ord bigint, email text, vars jsonb).
CREATE FUNCTION edm.create_task_from_staged(
  p_user_id text, p_name text, p_templates jsonb,
  p_priority integer DEFAULT 0, p_scheduled_at timestamptz DEFAULT NULL,
  p_skip_invalid boolean DEFAULT false)
RETURNS TABLE (task_id bigint, recipients integer, invalid integer, duplicates integer,
               suppressed integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_task bigint;
  v_invalid integer;
  v_dups integer;
  v_supp integer;
  v_n integer;
  v_first record;
BEGIN
  SELECT count(*) FILTER (WHERE edm.email_problem(s.email) IS NOT NULL) INTO v_invalid
  FROM pg_temp.edm_stage_recipients s;
  IF v_invalid > 0 AND NOT p_skip_invalid THEN
    SELECT s.email, edm.email_problem(s.email) AS problem INTO v_first
    FROM pg_temp.edm_stage_recipients s WHERE edm.email_problem(s.email) IS NOT NULL
    ORDER BY s.ord LIMIT 1;
    RAISE EXCEPTION '% invalid recipient address(es), first %: %', v_invalid,
      quote_literal(v_first.email), v_first.problem USING ERRCODE = 'ED005';
  END IF;
  v_task := edm.new_task(p_user_id, p_name, p_templates, 'scheduled', p_priority, p_scheduled_at,
                         jsonb_build_object('list', (SELECT count(*) FROM pg_temp.edm_stage_recipients)));

  -- One set-based statement: normalise, dedupe (first occurrence wins),
  -- drop suppressed and unsubscribed addresses, rotate templates.
  WITH valid AS (
    SELECT DISTINCT ON (edm.normalize_email(s.email))
           edm.normalize_email(s.email) AS email, s.vars, s.ord
    FROM pg_temp.edm_stage_recipients s
    WHERE edm.email_problem(s.email) IS NULL
    ORDER BY edm.normalize_email(s.email), s.ord
  ),
  kept AS (
    SELECT v.email, v.vars, v.ord FROM valid v
    -- suppression inlined as an anti-join (see expand_task)
    WHERE NOT EXISTS (SELECT 1 FROM edm.suppressions s
                      WHERE s.email = v.email AND (s.user_id IS NULL OR s.user_id = p_user_id))
      AND NOT EXISTS (SELECT 1 FROM edm.contacts c
                      WHERE c.user_id = p_user_id AND c.email = v.email AND c.unsubscribed)
  )
  INSERT INTO edm.subtasks (task_id, email, template_idx, vars)
  SELECT v_task, k.email,
         ((row_number() OVER (ORDER BY k.ord) - 1) % (SELECT t.template_count FROM edm.tasks t WHERE t.task_id = v_task))::smallint,
         k.vars
  FROM kept k ORDER BY k.ord;
  GET DIAGNOSTICS v_n = ROW_COUNT;

  SELECT count(*) - count(DISTINCT edm.normalize_email(s.email)) INTO v_dups
  FROM pg_temp.edm_stage_recipients s WHERE edm.email_problem(s.email) IS NULL;
  v_supp := (SELECT count(*) FROM pg_temp.edm_stage_recipients s
             WHERE edm.email_problem(s.email) IS NULL) - v_dups - v_n;

  PERFORM edm.reserve_quota(p_user_id, v_n);
  UPDATE edm.tasks t SET total_count = v_n, pending_count = v_n, quota_reserved = v_n
  WHERE t.task_id = v_task;
  IF v_n = 0 THEN
    UPDATE edm.tasks t SET status = 'sending' WHERE t.task_id = v_task;
    UPDATE edm.tasks t SET status = 'completed' WHERE t.task_id = v_task;
  END IF;
  RETURN QUERY SELECT v_task, v_n, v_invalid, v_dups, v_supp;
END;
$$;
COMMENT ON FUNCTION edm.create_task_from_staged(text, text, jsonb, integer, timestamptz, boolean) IS
  'Creates a task from the explicit list COPYed into the session''s temporary table edm_stage_recipients, in one transaction: invalid addresses refuse the task (or are skipped with p_skip_invalid), duplicates are merged, suppressed and unsubscribed addresses dropped, the user''s quota reserved (ED002 and nothing written when short). Returns the counts.';

CREATE FUNCTION edm.rule_matches(p_rule jsonb, p_tags text[])
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (NOT (p_rule ? 'include_any') OR jsonb_array_length(p_rule -> 'include_any') = 0
          OR p_tags && ARRAY(SELECT jsonb_array_elements_text(p_rule -> 'include_any')))
   AND (NOT (p_rule ? 'include_all')
          OR p_tags @> ARRAY(SELECT jsonb_array_elements_text(p_rule -> 'include_all')))
   AND (NOT (p_rule ? 'exclude')
          OR NOT p_tags && ARRAY(SELECT jsonb_array_elements_text(p_rule -> 'exclude')));
COMMENT ON FUNCTION edm.rule_matches(jsonb, text[]) IS
  'True when a contact with tags p_tags matches tag rule p_rule {"include_any": [...], "include_all": [...], "exclude": [...]}. For display and tests; expansion inlines the same predicates so the GIN index on tags is used.';

CREATE FUNCTION edm.create_task_from_rule(
  p_user_id text, p_name text, p_templates jsonb, p_rule jsonb,
  p_priority integer DEFAULT 0, p_scheduled_at timestamptz DEFAULT NULL)
RETURNS TABLE (task_id bigint, recipients integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_task bigint;
  v_any text[] := ARRAY(SELECT jsonb_array_elements_text(coalesce(p_rule -> 'include_any', '[]')));
  v_all text[] := ARRAY(SELECT jsonb_array_elements_text(coalesce(p_rule -> 'include_all', '[]')));
  v_exc text[] := ARRAY(SELECT jsonb_array_elements_text(coalesce(p_rule -> 'exclude', '[]')));
  v_n bigint;
BEGIN
  IF cardinality(v_any) = 0 AND cardinality(v_all) = 0 THEN
    RAISE EXCEPTION 'a tag rule needs include_any or include_all tags' USING ERRCODE = 'ED005';
  END IF;
  PERFORM edm.require_user(p_user_id);
  -- Reserve for every contact the rule matches now; the expansion refunds
  -- what it does not use (contacts removed or suppressed meanwhile).
  SELECT count(*) INTO v_n FROM edm.contacts c
  WHERE c.user_id = p_user_id AND NOT c.unsubscribed
    AND (cardinality(v_any) = 0 OR c.tags && v_any)
    AND (cardinality(v_all) = 0 OR c.tags @> v_all)
    AND NOT c.tags && v_exc
    AND NOT EXISTS (SELECT 1 FROM edm.suppressions s   -- edm.is_suppressed, inlined
                    WHERE s.email = c.email AND (s.user_id IS NULL OR s.user_id = p_user_id));
  PERFORM edm.reserve_quota(p_user_id, v_n);
  v_task := edm.new_task(p_user_id, p_name, p_templates, 'expanding', p_priority, p_scheduled_at,
                         jsonb_build_object('include_any', v_any, 'include_all', v_all, 'exclude', v_exc));
  UPDATE edm.tasks t SET quota_reserved = v_n, expansion_cursor = 0 WHERE t.task_id = v_task;
  RETURN QUERY SELECT v_task, v_n::integer;
END;
$$;
COMMENT ON FUNCTION edm.create_task_from_rule(text, text, jsonb, jsonb, integer, timestamptz) IS
  'Creates a task from a tag rule in status expanding and reserves the user''s quota for every matching contact (ED002 and nothing written when short). Subtasks are then created by edm.expand_task() in chunks, each its own transaction.';

CREATE FUNCTION edm.expand_task(p_task_id bigint, p_chunk integer DEFAULT 1000000)
RETURNS TABLE (added integer, done boolean)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  t record;
  v_any text[];
  v_all text[];
  v_exc text[];
  v_added integer;
  v_last bigint;
BEGIN
  IF p_chunk IS NULL OR p_chunk NOT BETWEEN 1 AND 10000000 THEN
    RAISE EXCEPTION 'chunk must be between 1 and 10000000' USING ERRCODE = 'ED005';
  END IF;
  SELECT tk.task_id, tk.user_id, tk.status, tk.recipient_rule, tk.expansion_cursor, tk.template_count,
         tk.total_count, tk.quota_reserved
  INTO t FROM edm.tasks tk WHERE tk.task_id = p_task_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'ED001';
  END IF;
  IF t.status <> 'expanding' THEN
    RETURN QUERY SELECT 0, true;
    RETURN;
  END IF;
  v_any := ARRAY(SELECT jsonb_array_elements_text(t.recipient_rule -> 'include_any'));
  v_all := ARRAY(SELECT jsonb_array_elements_text(t.recipient_rule -> 'include_all'));
  v_exc := ARRAY(SELECT jsonb_array_elements_text(t.recipient_rule -> 'exclude'));

  -- Never more recipients than reserved at creation: contacts that came to
  -- match since then are left out rather than pushing the user past the
  -- quota (and the expansion into a CHECK violation it could never finish).
  -- The suppression test is edm.is_suppressed() written out as NOT EXISTS:
  -- the planner cannot inline that function (its body is a sub-select), and
  -- a call per contact made the suppression check most of the cost of a
  -- million-contact expansion (see benchmarks/expansion.py); as an anti-join
  -- it is one index probe per contact.
  WITH chunk AS (
    SELECT c.contact_id, c.email
    FROM edm.contacts c
    WHERE c.user_id = t.user_id AND c.contact_id > t.expansion_cursor AND NOT c.unsubscribed
      AND (cardinality(v_any) = 0 OR c.tags && v_any)
      AND (cardinality(v_all) = 0 OR c.tags @> v_all)
      AND NOT c.tags && v_exc
      AND NOT EXISTS (SELECT 1 FROM edm.suppressions s
                      WHERE s.email = c.email AND (s.user_id IS NULL OR s.user_id = t.user_id))
    ORDER BY c.contact_id
    LIMIT least(p_chunk, greatest(t.quota_reserved - t.total_count, 0))
  ),
  ins AS (
    INSERT INTO edm.subtasks (task_id, email, contact_id, template_idx)
    SELECT p_task_id, ch.email, ch.contact_id,
           ((t.total_count + row_number() OVER (ORDER BY ch.contact_id) - 1) % t.template_count)::smallint
    FROM chunk ch
    RETURNING contact_id
  )
  SELECT count(*), max(contact_id) INTO v_added, v_last FROM ins;

  IF v_added = p_chunk THEN
    UPDATE edm.tasks tk SET total_count = tk.total_count + v_added,
                            pending_count = tk.pending_count + v_added,
                            expansion_cursor = v_last
    WHERE tk.task_id = p_task_id;
    RETURN QUERY SELECT v_added, false;
    RETURN;
  END IF;
  -- Last chunk: refund what the reservation over-estimated, then schedule.
  UPDATE edm.users u SET quota_used = u.quota_used - (tk.quota_reserved - (tk.total_count + v_added))
  FROM edm.tasks tk WHERE tk.task_id = p_task_id AND u.user_id = tk.user_id;
  UPDATE edm.tasks tk SET total_count = tk.total_count + v_added,
                          pending_count = tk.pending_count + v_added,
                          quota_reserved = tk.total_count + v_added,
                          expansion_cursor = NULL,
                          status = 'scheduled'
  WHERE tk.task_id = p_task_id;
  IF (SELECT tk.total_count FROM edm.tasks tk WHERE tk.task_id = p_task_id) = 0 THEN
    UPDATE edm.tasks tk SET status = 'sending' WHERE tk.task_id = p_task_id;
    UPDATE edm.tasks tk SET status = 'completed' WHERE tk.task_id = p_task_id;
  END IF;
  RETURN QUERY SELECT v_added, true;
END;
$$;
COMMENT ON FUNCTION edm.expand_task(bigint, integer) IS
  'Creates the next chunk (at most p_chunk) of subtasks of an expanding tag-rule task, in contact order; progress is visible in total_count. Never creates more subtasks than the task reserved at creation (contacts matching only since then are left out). The last chunk refunds unused quota and moves the task to scheduled. Safe to call again after a crash: it resumes from expansion_cursor.';

-- ---------------------------------------------------------------------------
-- Lifecycle: pause, resume, cancel
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.lock_task(p_task_id bigint, p_user_id text)
RETURNS edm.tasks
LANGUAGE plpgsql
AS $$
DECLARE
  t edm.tasks;
BEGIN
  SELECT * INTO t FROM edm.tasks tk
  WHERE tk.task_id = p_task_id AND (p_user_id IS NULL OR tk.user_id = p_user_id)
  FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'ED001';
  END IF;
  RETURN t;
END;
$$;
COMMENT ON FUNCTION edm.lock_task(bigint, text) IS
  'Locks and returns task p_task_id, scoped to p_user_id when given (another user''s task is "unknown", ED001).';

CREATE FUNCTION edm.pause_task(p_task_id bigint, p_user_id text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  t edm.tasks := edm.lock_task(p_task_id, p_user_id);
BEGIN
  IF t.status = 'paused' THEN
    RETURN 'paused';
  END IF;
  IF t.status NOT IN ('scheduled', 'sending') THEN
    RAISE EXCEPTION 'cannot pause task % in status %', p_task_id, t.status USING ERRCODE = 'ED003';
  END IF;
  UPDATE edm.tasks tk SET status = 'paused' WHERE tk.task_id = p_task_id;
  RETURN 'paused';
END;
$$;
COMMENT ON FUNCTION edm.pause_task(bigint, text) IS
  'Pauses a scheduled or sending task: no claim commits for it after this commits (a claim holding the task''s row lock finishes first). Leased subtasks complete normally. Idempotent.';

CREATE FUNCTION edm.resume_task(p_task_id bigint, p_user_id text DEFAULT NULL, p_now timestamptz DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  t edm.tasks := edm.lock_task(p_task_id, p_user_id);
  v_status text;
BEGIN
  IF t.status IN ('scheduled', 'sending') THEN
    RETURN t.status;
  END IF;
  IF t.status <> 'paused' THEN
    RAISE EXCEPTION 'cannot resume task % in status %', p_task_id, t.status USING ERRCODE = 'ED003';
  END IF;
  v_status := CASE WHEN t.scheduled_at > coalesce(p_now, now()) THEN 'scheduled' ELSE 'sending' END;
  UPDATE edm.tasks tk SET status = v_status WHERE tk.task_id = p_task_id;
  IF v_status = 'sending' AND t.pending_count = 0 AND t.leased_count = 0 THEN
    UPDATE edm.tasks tk SET status = 'completed' WHERE tk.task_id = p_task_id;
    v_status := 'completed';
  END IF;
  RETURN v_status;
END;
$$;
COMMENT ON FUNCTION edm.resume_task(bigint, text, timestamptz) IS
  'Resumes a paused task where it stopped (its pending subtasks keep their order; nothing is re-sent). Returns the new status.';

CREATE FUNCTION edm.cancel_task(p_task_id bigint, p_user_id text DEFAULT NULL, p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  t edm.tasks := edm.lock_task(p_task_id, p_user_id);
  v_n integer;
BEGIN
  IF t.status = 'cancelled' THEN
    RETURN 0;
  END IF;
  IF t.status IN ('completed', 'failed') THEN
    RAISE EXCEPTION 'cannot cancel task % in status %', p_task_id, t.status USING ERRCODE = 'ED003';
  END IF;
  UPDATE edm.subtasks st SET status = 'cancelled', finished_at = coalesce(p_now, now())
  WHERE st.task_id = p_task_id AND st.status = 'pending';
  GET DIAGNOSTICS v_n = ROW_COUNT;
  UPDATE edm.tasks tk
  SET status = 'cancelled', pending_count = tk.pending_count - v_n,
      cancelled_count = tk.cancelled_count + v_n,
      quota_reserved = greatest(tk.quota_reserved - v_n - CASE WHEN tk.status = 'expanding'
                                                        THEN tk.quota_reserved - tk.total_count ELSE 0 END, 0),
      expansion_cursor = NULL
  WHERE tk.task_id = p_task_id;
  -- Refund: every subtask never claimed, plus an unfinished expansion's
  -- reservation for recipients never created.
  UPDATE edm.users u
  SET quota_used = u.quota_used - v_n
                   - CASE WHEN t.status = 'expanding' THEN greatest(t.quota_reserved - t.total_count, 0) ELSE 0 END
  WHERE u.user_id = t.user_id;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.cancel_task(bigint, text, timestamptz) IS
  'Cancels a task: its pending subtasks become cancelled and their reserved quota is refunded to the user; leased subtasks finish (a retry after cancel becomes cancelled). Returns how many subtasks were cancelled.';
