-- The current definition of every object of schema edm, grouped by concept.
--
-- GENERATED from a database built by sql/migrations/ with
--     python -m edm_sched.schema_dump > sql/schema.sql
-- Do not edit: change the schema with a new migration, then regenerate this
-- file. tests/sql/test_schema_file.py builds one database from the migrations
-- and one from this file and fails on any difference in the catalog.
--
-- Loading this file into an empty database (psql -f, or edm_sched.migrate(dsn,
-- from_schema=True)) gives the same schema as running every migration, with
-- every migration recorded as applied.

SET check_function_bodies = false;
SET search_path = pg_catalog;

CREATE SCHEMA edm;
COMMENT ON SCHEMA edm IS 'edm-sched: fair, rate-limited, crash-safe scheduling of email sends. See docs/operations.md.';

-- ==========================================================================
-- Migrations
-- Which migrations built this schema (all of them, when loaded from this file), and the helpers migrations use to change a function or the roles' grants in place.
-- ==========================================================================

CREATE TABLE edm.schema_migrations (
  version integer NOT NULL,
  name text NOT NULL,
  checksum text NOT NULL,
  applied_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT schema_migrations_pkey PRIMARY KEY (version)
);
COMMENT ON TABLE edm.schema_migrations IS 'Migrations applied to this database, with the SHA-256 of each file as applied.';
COMMENT ON COLUMN edm.schema_migrations.version IS 'Number of the migration file (sql/migrations/NNNN_name.sql).';
COMMENT ON COLUMN edm.schema_migrations.name IS 'Name part of the migration file.';
COMMENT ON COLUMN edm.schema_migrations.checksum IS 'SHA-256 of the file when applied; an edited file is refused.';
COMMENT ON COLUMN edm.schema_migrations.applied_at IS 'When the migration was applied.';
INSERT INTO edm.schema_migrations (version, name, checksum) VALUES
  ('1', 'schema', 'bf490b3d84a14e4633189ca11e4794ae737d5d50083da4fd05db5df85a744317'),
  ('10', 'adoption', 'c230948f6d9d555e29183dad1faec2ce04b1f405a5be3d0354b178e9bc9ba17e'),
  ('11', 'jobs_security', 'ef1677dd93d453d5c66404b1d3798c92c0f1e66a0cdf7087aa960c44a23fb46c'),
  ('12', 'bounds', '19fdc73938a5b322674957811547c13127d49c4599e73bdd726ed0aa6991a9c3'),
  ('14', 'claim_batched', '4d6df83cf6aa1d964f8c7bf54d0cbfd556f7050cab3d0259636a2874070043ca'),
  ('15', 'sites', 'b7e5b0ee34c22dc8c52002c31654eba699dd632dbd4b5be60233948c3d0965cb'),
  ('16', 'shaping', '23eb702b9daed4dc1858396200b1b8f19a657044ed5985b06825065c10067098'),
  ('17', 'reply_rules', 'c72e72fccca9da5ad3adb55af92cd6fbbb4b9f51fc97a943575ecc8ac63cda3b'),
  ('18', 'warmup', 'bc4b6575e6756708a61ff1060ac98c0a82d50ea6a7c91f59440a8d781baea3a6'),
  ('19', 'house', '787762ce7e7bde85f001dd8a3805ceff14157e80cebc3106601872a6ea4220a1'),
  ('2', 'dispatch', 'bc6a4b1727571aac3ca05f28e1043d5d7f2f8d159c3eadfb3f9577a0f30777a1'),
  ('20', 'wire_pacing', '3cef6a420fbb3d7993bf6d23f2abf007d74f375a2a05b90831e039648e4a0f00'),
  ('21', 'vocabulary', 'ef24b9aa51c1dd25cefa9feebc1f4485e065393d01f9277848d54cd41f9479f5'),
  ('22', 'shaped_claim_cost', '54926cd176d31babc513cee1973676dcf4c00fae42d7cdbf946e56d524e635c1'),
  ('23', 'site_release', '8f42f833ddc9da64422459dc722d9ea6225ad9f8ea4e4367c3b09b21f1ef9f5b'),
  ('24', 'arrival_margin', '11872ab0c602fad94bd10cbf580f59b4590ac43dc16a1cb2d436a5e44065ce6f'),
  ('25', 'service_site_rules', '57132e24af7912ead5bf2b9756927b7d5e5ae146f42a8f8cc777b83706ed5940'),
  ('26', 'cycle_overheads', 'faf20ce3b7a831e084bd4171687938882b68f70fd6e493043d0e61c2f8d2a805'),
  ('27', 'idle_services', 'e771a5eddf0a7f0e6f5e55d90e128aacc12774f53ec596a9cc6491b11a3d719b'),
  ('28', 'batch_costs', '510c471b4544062592d34c490396f6caf27c27e8991b8a647b417d8127248231'),
  ('29', 'claim_batch_default', 'a7d6642ad7befc42311020d68b73e7e6bef9c425224624a366aca336943b1d6f'),
  ('3', 'host_api', '9c9bae7816b3ae459cdcdb6ad27016712118622f1fac1ddb671b022ab9540ded'),
  ('30', 'small_pools', '00908793cb415a7c51fb5581e0d4002391c9464306af11552f3efefa30946c9f'),
  ('31', 'slot_lead_within_horizon', 'ee923bd93c1b40e79198723c67e5d64389d924d2b4a388b074e0e678409a3df5'),
  ('4', 'operations', 'e44d92bd5da352e3547350e9b90af8ade691d5d393e8231d7211e8f761bcfcf3'),
  ('5', 'jobs', '308e65f110e86df8835d0b6ad37abf659cee2a1bed5b7084b0d27fd400818ade'),
  ('6', 'security', '297c8a9e81af65f15d976fac864462a3f6d6257e28a4a0f526dea259a68e7e03'),
  ('7', 'claim_performance', 'b784140bfb7b7d14ef601d1808000dfce531fb0ef3a26ab289a4d427a3201ade'),
  ('8', 'limits_and_slots', '3a44c8f5f0d00d6e43511cb8f80e92ea8b78506d2543b53eae2839b111eaa48a'),
  ('9', 'deliverability', 'cbc882eb56054a6406386d0f1d6bb0ccf792573c4745f281572d929d150a7c13');

CREATE FUNCTION edm.patch_function(p_fn regprocedure, p_patch text[], p_context text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_def text := pg_get_functiondef(p_fn);
  v_sig text := p_fn::text;
  v_comment text := obj_description(p_fn, 'pg_proc');
  v_acl aclitem[] := (SELECT p.proacl FROM pg_proc p WHERE p.oid = p_fn);
  v_new regprocedure;
  g record;
  i integer;
BEGIN
  FOR i IN 1 .. coalesce(array_length(p_patch, 1), 0) LOOP
    IF position(p_patch[i][1] IN v_def) = 0 THEN
      RAISE EXCEPTION '%: % has no %; patch it by hand', p_context, p_fn, p_patch[i][1];
    END IF;
    v_def := replace(v_def, p_patch[i][1], p_patch[i][2]);
  END LOOP;
  BEGIN
    EXECUTE v_def;
  EXCEPTION WHEN invalid_function_definition THEN
    -- a parameter renamed or the result changed: drop, create, restore
    EXECUTE format('DROP FUNCTION %s', v_sig);
    EXECUTE v_def;
    v_new := to_regprocedure(v_sig);
    IF v_new IS NULL THEN
      RAISE EXCEPTION '%: the patch changed the argument types of %; patch it by hand',
        p_context, v_sig;
    END IF;
    EXECUTE format('COMMENT ON FUNCTION %s IS %L', v_new, v_comment);
    IF v_acl IS NOT NULL THEN
      EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_new);
      FOR g IN SELECT a.grantee, a.is_grantable FROM aclexplode(v_acl) a
               WHERE a.privilege_type = 'EXECUTE'
                 AND a.grantee <> (SELECT p.proowner FROM pg_proc p WHERE p.oid = v_new) LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s%s', v_new,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.grantee::regrole::text) END,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
      END LOOP;
    END IF;
  END;
END;
$function$;
COMMENT ON FUNCTION edm.patch_function(regprocedure,text[],text) IS 'For migrations: rewrites function p_fn as the catalog has it now, replacing each p_patch[i][1] by p_patch[i][2], so that what earlier migrations put in it is kept; fails (naming p_context, the migration) when a text to replace is not found. A patch that renames parameters or changes the result drops and recreates the function, keeping its comment and grants.';
REVOKE ALL ON FUNCTION edm.patch_function(regprocedure,text[],text) FROM PUBLIC;

CREATE FUNCTION edm.extend_roles(p_patch text[], p_context text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  PERFORM edm.patch_function('edm.install_roles(text, text, text)'::regprocedure, p_patch, p_context);
  -- Databases whose roles were installed already get the new grants now (the
  -- default role names; with other names, call edm.install_roles(...) again).
  IF (SELECT count(*) FROM pg_roles r
      WHERE r.rolname IN ('edm_dispatcher', 'edm_app', 'edm_monitor')) = 3 THEN
    PERFORM edm.install_roles();
  END IF;
END;
$function$;
COMMENT ON FUNCTION edm.extend_roles(text[],text) IS 'For migrations: adds a migration''s names to the grant lists of edm.install_roles (edm.patch_function) and re-applies the grants where the default roles exist.';
REVOKE ALL ON FUNCTION edm.extend_roles(text[],text) FROM PUBLIC;

-- ==========================================================================
-- Validation helpers
-- Pure functions used by CHECK constraints and by the functions below.
-- ==========================================================================

CREATE FUNCTION edm.is_valid_email(p_email text)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
RETURN ((length(p_email) <= 254) AND (p_email ~ '^[^@[:space:][:cntrl:]<>(),;:"\[\]\\]+@[^@[:space:][:cntrl:]<>(),;:"\[\]\\]+\.[^@[:space:][:cntrl:]<>(),;:"\[\]\\.]+$'::text));
COMMENT ON FUNCTION edm.is_valid_email(text) IS 'Conservative syntax check of an address: one @, a dotted domain, no spaces, control characters (CR/LF) or RFC 5322 specials, at most 254 characters.';
REVOKE ALL ON FUNCTION edm.is_valid_email(text) FROM PUBLIC;

CREATE FUNCTION edm.normalize_email(p_email text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
RETURN lower(btrim(p_email));
COMMENT ON FUNCTION edm.normalize_email(text) IS 'Normalised address: trimmed and lower-cased. Subtasks, contacts and suppressions store addresses in this form.';
REVOKE ALL ON FUNCTION edm.normalize_email(text) FROM PUBLIC;

CREATE FUNCTION edm.email_problem(p_email text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN ((p_email IS NULL) OR (btrim(p_email) = ''::text)) THEN 'empty address'::text WHEN (length(p_email) > 254) THEN 'longer than 254 characters'::text WHEN (p_email ~ '[[:cntrl:]]'::text) THEN 'contains control characters (CR, LF, NUL...)'::text WHEN (p_email ~ '[\u00a0\u00ad\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\ufeff]'::text) THEN 'contains invisible or non-breaking space characters'::text WHEN (POSITION(('@'::text) IN (p_email)) = 0) THEN 'missing @'::text WHEN (NOT edm.is_valid_email(edm.normalize_email(p_email))) THEN 'not a valid address'::text WHEN (octet_length(split_part(btrim(p_email), '@'::text, 1)) > 64) THEN 'local part longer than 64 octets'::text WHEN (split_part(btrim(p_email), '@'::text, 1) ~ '(^\.|\.$|\.\.)'::text) THEN 'local part has a leading, trailing or double dot'::text WHEN (NOT (split_part(btrim(p_email), '@'::text, 2) ~ '^([A-Za-z0-9\u0080-\U0010ffff]([A-Za-z0-9\u0080-\U0010ffff-]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?\.)+[A-Za-z0-9\u0080-\U0010ffff]([A-Za-z0-9\u0080-\U0010ffff-]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?$'::text)) THEN 'domain is not a host name (letters, digits and inner hyphens, labels of 1 to 63)'::text WHEN (split_part(btrim(p_email), '@'::text, 2) ~ '\.[0-9]+$'::text) THEN 'domain ends in a number (an IP address?)'::text WHEN ((p_email !~ '^[ -~]*$'::text) AND (NOT (btrim(p_email) IS NFC NORMALIZED))) THEN 'not in Unicode normal form C'::text ELSE NULL::text END;
COMMENT ON FUNCTION edm.email_problem(text) IS 'Why p_email is not acceptable as an address, or NULL when it is: empty, too long, control or invisible characters, no @, specials, a local part over 64 octets or with a leading, trailing or double dot, a domain that is not a host name or ends in a number, or a non-ASCII address not in Unicode NFC. Internationalised addresses are accepted (they are sent with SMTPUTF8). Used for the per-address report of task creation, contact import, suppressions and service senders.';
REVOKE ALL ON FUNCTION edm.email_problem(text) FROM PUBLIC;

CREATE FUNCTION edm.is_valid_timezone(p_tz text)
 RETURNS boolean
 LANGUAGE plpgsql
 IMMUTABLE PARALLEL SAFE
AS $function$
BEGIN
  IF p_tz IS NULL OR length(p_tz) > 64 OR p_tz ~ '[[:cntrl:]]' THEN
    RETURN false;
  END IF;
  PERFORM timestamptz '2000-01-01 00:00:00+00' AT TIME ZONE p_tz;
  RETURN true;
EXCEPTION WHEN invalid_parameter_value OR data_exception THEN
  RETURN false;
END;
$function$;
COMMENT ON FUNCTION edm.is_valid_timezone(text) IS 'True when p_tz is a time zone name PostgreSQL knows (e.g. Europe/Paris). Used by CHECK constraints on quota and job time zones.';
REVOKE ALL ON FUNCTION edm.is_valid_timezone(text) FROM PUBLIC;

CREATE FUNCTION edm.rule_matches(p_rule jsonb, p_tags text[])
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN (((NOT (p_rule ? 'include_any'::text)) OR (jsonb_array_length((p_rule -> 'include_any'::text)) = 0) OR (p_tags && ARRAY(SELECT jsonb_array_elements_text((p_rule -> 'include_any'::text)) AS jsonb_array_elements_text))) AND ((NOT (p_rule ? 'include_all'::text)) OR (p_tags @> ARRAY(SELECT jsonb_array_elements_text((p_rule -> 'include_all'::text)) AS jsonb_array_elements_text))) AND ((NOT (p_rule ? 'exclude'::text)) OR (NOT (p_tags && ARRAY(SELECT jsonb_array_elements_text((p_rule -> 'exclude'::text)) AS jsonb_array_elements_text)))));
COMMENT ON FUNCTION edm.rule_matches(jsonb,text[]) IS 'True when a contact with tags p_tags matches tag rule p_rule {"include_any": [...], "include_all": [...], "exclude": [...]}. For display and tests; expansion inlines the same predicates so the GIN index on tags is used.';
REVOKE ALL ON FUNCTION edm.rule_matches(jsonb,text[]) FROM PUBLIC;

CREATE FUNCTION edm.task_transition_ok(p_from text, p_to text)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN (((p_from IS NULL) AND (p_to = ANY (ARRAY['draft'::text, 'expanding'::text, 'scheduled'::text]))) OR (((((((((((((((((p_from = 'draft'::text) AND (p_to = 'expanding'::text)) OR ((p_from = 'draft'::text) AND (p_to = 'scheduled'::text))) OR ((p_from = 'draft'::text) AND (p_to = 'cancelled'::text))) OR ((p_from = 'expanding'::text) AND (p_to = 'scheduled'::text))) OR ((p_from = 'expanding'::text) AND (p_to = 'failed'::text))) OR ((p_from = 'expanding'::text) AND (p_to = 'cancelled'::text))) OR ((p_from = 'scheduled'::text) AND (p_to = 'sending'::text))) OR ((p_from = 'scheduled'::text) AND (p_to = 'paused'::text))) OR ((p_from = 'scheduled'::text) AND (p_to = 'cancelled'::text))) OR ((p_from = 'sending'::text) AND (p_to = 'completed'::text))) OR ((p_from = 'sending'::text) AND (p_to = 'paused'::text))) OR ((p_from = 'sending'::text) AND (p_to = 'cancelled'::text))) OR ((p_from = 'sending'::text) AND (p_to = 'failed'::text))) OR ((p_from = 'paused'::text) AND (p_to = 'scheduled'::text))) OR ((p_from = 'paused'::text) AND (p_to = 'sending'::text))) OR ((p_from = 'paused'::text) AND (p_to = 'cancelled'::text))));
COMMENT ON FUNCTION edm.task_transition_ok(text,text) IS 'The task status machine: draft → expanding → scheduled → sending → completed; scheduled/sending ↔ paused; cancelled from any live state; failed from expanding or sending.';
REVOKE ALL ON FUNCTION edm.task_transition_ok(text,text) FROM PUBLIC;

CREATE FUNCTION edm.ts_add_ms(p_ts timestamp with time zone, p_ms bigint)
 RETURNS timestamp with time zone
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN (p_ts + ((p_ms)::double precision * '00:00:00.001'::interval));
COMMENT ON FUNCTION edm.ts_add_ms(timestamp with time zone,bigint) IS 'p_ts + p_ms milliseconds. Immutable because a pure-time interval does not depend on the session time zone; used by generated columns.';
REVOKE ALL ON FUNCTION edm.ts_add_ms(timestamp with time zone,bigint) FROM PUBLIC;

CREATE FUNCTION edm.epoch_ms(p_ts timestamp with time zone)
 RETURNS bigint
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN (floor((EXTRACT(epoch FROM p_ts) * (1000)::numeric)))::bigint;
COMMENT ON FUNCTION edm.epoch_ms(timestamp with time zone) IS 'Milliseconds since 1970-01-01 UTC (floor).';
REVOKE ALL ON FUNCTION edm.epoch_ms(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.smtp_code_suppresses(p_code integer)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN (p_code = ANY (ARRAY[550, 551, 553]));
COMMENT ON FUNCTION edm.smtp_code_suppresses(integer) IS 'True for permanent reply codes that mean the address itself is bad (550 mailbox unavailable, 551 user not local, 553 mailbox name not allowed): the address is suppressed for everyone.';
REVOKE ALL ON FUNCTION edm.smtp_code_suppresses(integer) FROM PUBLIC;

CREATE FUNCTION edm.headers_problem(p_headers jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN ((p_headers IS NULL) OR (p_headers = 'null'::jsonb)) THEN NULL::text WHEN (jsonb_typeof(p_headers) <> 'object'::text) THEN 'headers must be a JSON object'::text WHEN ((SELECT count(*) AS count FROM jsonb_object_keys(headers_problem.p_headers) jsonb_object_keys(jsonb_object_keys)) > 50) THEN 'at most 50 header fields'::text WHEN (SELECT (count(DISTINCT lower(k.k)) <> count(*)) FROM jsonb_object_keys(headers_problem.p_headers) k(k)) THEN 'a header field is given twice'::text ELSE (SELECT CASE WHEN (h.k !~ '^[!-9;-~]{1,76}$'::text) THEN format('header name %s is not 1-76 printable ASCII characters without ":"'::text, quote_literal(h.k)) WHEN ((lower(h.k) = ANY (ARRAY['from'::text, 'to'::text, 'cc'::text, 'bcc'::text, 'subject'::text, 'reply-to'::text, 'sender'::text, 'message-id'::text, 'date'::text, 'mime-version'::text, 'content-type'::text, 'content-transfer-encoding'::text, 'content-disposition'::text, 'content-id'::text, 'list-unsubscribe'::text, 'list-unsubscribe-post'::text, 'return-path'::text, 'received'::text, 'received-spf'::text, 'authentication-results'::text, 'dkim-signature'::text, 'domainkey-signature'::text, 'arc-seal'::text, 'arc-message-signature'::text, 'arc-authentication-results'::text, 'delivered-to'::text, 'x-original-to'::text, 'bounces-to'::text, 'errors-to'::text])) OR (lower(h.k) ~ '^(resent-|x-edm-)'::text)) THEN format('header %s is set by edm-sched or by relays and may not be given'::text, h.k) WHEN (jsonb_typeof(h.v) <> 'string'::text) THEN format('header %s: the value must be a string'::text, h.k) WHEN ((h.v #>> '{}'::text[]) ~ '[\x01-\x08\x0a-\x1f\x7f\u0085\u2028\u2029]'::text) THEN format('header %s: the value contains a line break or a control character'::text, h.k) WHEN (length((h.v #>> '{}'::text[])) > 900) THEN format('header %s: the value is longer than 900 characters'::text, h.k) ELSE NULL::text END AS "case" FROM jsonb_each(headers_problem.p_headers) h(k, v) ORDER BY CASE WHEN (h.k !~ '^[!-9;-~]{1,76}$'::text) THEN format('header name %s is not 1-76 printable ASCII characters without ":"'::text, quote_literal(h.k)) WHEN ((lower(h.k) = ANY (ARRAY['from'::text, 'to'::text, 'cc'::text, 'bcc'::text, 'subject'::text, 'reply-to'::text, 'sender'::text, 'message-id'::text, 'date'::text, 'mime-version'::text, 'content-type'::text, 'content-transfer-encoding'::text, 'content-disposition'::text, 'content-id'::text, 'list-unsubscribe'::text, 'list-unsubscribe-post'::text, 'return-path'::text, 'received'::text, 'received-spf'::text, 'authentication-results'::text, 'dkim-signature'::text, 'domainkey-signature'::text, 'arc-seal'::text, 'arc-message-signature'::text, 'arc-authentication-results'::text, 'delivered-to'::text, 'x-original-to'::text, 'bounces-to'::text, 'errors-to'::text])) OR (lower(h.k) ~ '^(resent-|x-edm-)'::text)) THEN format('header %s is set by edm-sched or by relays and may not be given'::text, h.k) WHEN (jsonb_typeof(h.v) <> 'string'::text) THEN format('header %s: the value must be a string'::text, h.k) WHEN ((h.v #>> '{}'::text[]) ~ '[\x01-\x08\x0a-\x1f\x7f\u0085\u2028\u2029]'::text) THEN format('header %s: the value contains a line break or a control character'::text, h.k) WHEN (length((h.v #>> '{}'::text[])) > 900) THEN format('header %s: the value is longer than 900 characters'::text, h.k) ELSE NULL::text END LIMIT 1) END;
COMMENT ON FUNCTION edm.headers_problem(jsonb) IS 'Why p_headers (custom header fields, {"Name": "value"}) may not be added to messages, or NULL: not an object, more than 50 fields, a name given twice, a name that is not RFC 5322 field-name syntax, a field edm-sched or relays set (From, To, Cc, Bcc, Subject, Reply-To, Sender, Message-ID, Date, MIME and Content-* fields, List-Unsubscribe[-Post], Return-Path, Received*, Authentication-Results, DKIM/ARC signatures, Delivered-To, Resent-*, X-Edm-*), a value that is not a string, holds a line break or control character, or is longer than 900 characters. The Python models apply the same rules (edm_sched.rendering.header_problem).';
REVOKE ALL ON FUNCTION edm.headers_problem(jsonb) FROM PUBLIC;

-- ==========================================================================
-- Audit trail
-- The append-only record of administrative changes, written by triggers.
-- ==========================================================================

CREATE TABLE edm.audit_log (
  audit_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
  actor text NOT NULL,
  db_role text DEFAULT SESSION_USER NOT NULL,
  action text NOT NULL,
  object_type text NOT NULL,
  object_id text NOT NULL,
  before jsonb,
  after jsonb,
  CONSTRAINT audit_log_pkey PRIMARY KEY (audit_id),
  CONSTRAINT audit_log_action_check CHECK ((action = ANY (ARRAY['insert'::text, 'update'::text, 'delete'::text])))
);
COMMENT ON TABLE edm.audit_log IS 'Append-only record of administrative changes (services, grants, user quotas, task pause/resume/cancel, config, jobs) with before/after values. Secrets are never stored anywhere in edm, so none appear here.';
COMMENT ON COLUMN edm.audit_log.audit_id IS 'Surrogate id, in commit-ish order.';
COMMENT ON COLUMN edm.audit_log.at IS 'When the change was made.';
COMMENT ON COLUMN edm.audit_log.actor IS 'Who made it: the application user set in edm.actor (SET LOCAL edm.actor = ...), else the database role.';
COMMENT ON COLUMN edm.audit_log.db_role IS 'The database session role that made the change.';
COMMENT ON COLUMN edm.audit_log.action IS 'insert, update or delete.';
COMMENT ON COLUMN edm.audit_log.object_type IS 'service, grant, user, task, config or job.';
COMMENT ON COLUMN edm.audit_log.object_id IS 'Id of the object changed.';
COMMENT ON COLUMN edm.audit_log.before IS 'Audited fields before the change (NULL for inserts).';
COMMENT ON COLUMN edm.audit_log.after IS 'Audited fields after the change (NULL for deletes).';
CREATE INDEX audit_log_object_idx ON edm.audit_log USING btree (object_type, object_id, audit_id);
COMMENT ON INDEX edm.audit_log_object_idx IS 'History of one object.';
INSERT INTO edm.audit_log (audit_id, actor, db_role, action, object_type, object_id, before, after) OVERRIDING SYSTEM VALUE VALUES
  ('1', 'postgres', 'postgres', 'update', 'config', 'queue.shaping_arrival_margin_ms', '{"value": 25}', '{"value": 250}'),
  ('2', 'postgres', 'postgres', 'update', 'config', 'queue.central_batch_size', '{"value": 50}', '{"value": 200}');

CREATE FUNCTION edm.audit_log_append_only()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  RAISE EXCEPTION 'edm.audit_log is append-only' USING ERRCODE = '42501';
END;
$function$;
COMMENT ON FUNCTION edm.audit_log_append_only() IS 'Trigger: refuses UPDATE and DELETE on edm.audit_log, even for its owner.';
REVOKE ALL ON FUNCTION edm.audit_log_append_only() FROM PUBLIC;

CREATE FUNCTION edm.audit_fields(p_type text, p_row jsonb)
 RETURNS jsonb
 LANGUAGE sql
 IMMUTABLE
RETURN CASE p_type WHEN 'service'::text THEN jsonb_build_object('name', (p_row -> 'name'::text), 'transport', (p_row -> 'transport'::text), 'settings', (p_row -> 'settings'::text), 'credential_ref', (p_row -> 'credential_ref'::text), 'from_addresses', (p_row -> 'from_addresses'::text), 'interval_ms', (p_row -> 'interval_ms'::text), 'daily_quota', (p_row -> 'daily_quota'::text), 'quota_tz', (p_row -> 'quota_tz'::text), 'enabled', (p_row -> 'enabled'::text)) WHEN 'grant'::text THEN jsonb_build_object('service_id', (p_row -> 'service_id'::text), 'user_id', (p_row -> 'user_id'::text), 'priority', (p_row -> 'priority'::text)) WHEN 'user'::text THEN jsonb_build_object('display_name', (p_row -> 'display_name'::text), 'quota_limit', (p_row -> 'quota_limit'::text)) WHEN 'task'::text THEN jsonb_build_object('user_id', (p_row -> 'user_id'::text), 'name', (p_row -> 'name'::text), 'status', (p_row -> 'status'::text), 'priority', (p_row -> 'priority'::text), 'scheduled_at', (p_row -> 'scheduled_at'::text), 'total_count', (p_row -> 'total_count'::text)) WHEN 'config'::text THEN jsonb_build_object('value', (p_row -> 'value'::text)) WHEN 'job'::text THEN (p_row - ARRAY['next_run_at'::text, 'last_scheduled_for'::text, 'last_fired_at'::text, 'last_finished_at'::text, 'last_status'::text, 'run_count'::text, 'running_count'::text, 'success_count'::text, 'failure_count'::text, 'misfire_count'::text, 'created_at'::text, 'updated_at'::text]) ELSE NULL::jsonb END;
COMMENT ON FUNCTION edm.audit_fields(text,jsonb) IS 'The fields recorded in the audit log for an object type (administrative settings only, never counters or runtime state).';
REVOKE ALL ON FUNCTION edm.audit_fields(text,jsonb) FROM PUBLIC;

CREATE FUNCTION edm.audit_row()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_type text := TG_ARGV[0];
  v_before jsonb;
  v_after jsonb;
  v_id text;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    v_before := edm.audit_fields(v_type, to_jsonb(OLD));
  END IF;
  IF TG_OP <> 'DELETE' THEN
    v_after := edm.audit_fields(v_type, to_jsonb(NEW));
  END IF;
  IF TG_OP = 'UPDATE' AND v_before = v_after THEN
    RETURN NULL;
  END IF;
  v_id := CASE v_type
    WHEN 'service' THEN to_jsonb(coalesce(NEW, OLD)) ->> 'service_id'
    WHEN 'grant' THEN (to_jsonb(coalesce(NEW, OLD)) ->> 'service_id') || ':'
                      || (to_jsonb(coalesce(NEW, OLD)) ->> 'user_id')
    WHEN 'user' THEN to_jsonb(coalesce(NEW, OLD)) ->> 'user_id'
    WHEN 'task' THEN to_jsonb(coalesce(NEW, OLD)) ->> 'task_id'
    WHEN 'config' THEN to_jsonb(coalesce(NEW, OLD)) ->> 'key'
    WHEN 'job' THEN to_jsonb(coalesce(NEW, OLD)) ->> 'job_id'
  END;
  INSERT INTO edm.audit_log (actor, action, object_type, object_id, before, after)
  VALUES (coalesce(nullif(current_setting('edm.actor', true), ''), session_user),
          lower(TG_OP), v_type, v_id, v_before, v_after);
  RETURN NULL;
END;
$function$;
COMMENT ON FUNCTION edm.audit_row() IS 'Trigger: appends one edm.audit_log row per administrative change (argument: the object type). Updates that change no audited field are not recorded.';
REVOKE ALL ON FUNCTION edm.audit_row() FROM PUBLIC;

CREATE TRIGGER audit_log_append_only BEFORE DELETE OR UPDATE OR TRUNCATE ON edm.audit_log FOR EACH STATEMENT EXECUTE FUNCTION edm.audit_log_append_only();

-- ==========================================================================
-- Configuration
-- Typed, hot-reloaded settings; a refused value raises ED006 with the allowed range.
-- ==========================================================================

CREATE FUNCTION edm.config_value_ok(p_type text, p_value jsonb, p_min numeric, p_max numeric, p_allowed text[])
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE p_type WHEN 'integer'::text THEN ((jsonb_typeof(p_value) = 'number'::text) AND (((p_value #>> '{}'::text[]))::numeric = trunc(((p_value #>> '{}'::text[]))::numeric)) AND ((p_min IS NULL) OR (((p_value #>> '{}'::text[]))::numeric >= p_min)) AND ((p_max IS NULL) OR (((p_value #>> '{}'::text[]))::numeric <= p_max))) WHEN 'number'::text THEN ((jsonb_typeof(p_value) = 'number'::text) AND ((p_min IS NULL) OR (((p_value #>> '{}'::text[]))::numeric >= p_min)) AND ((p_max IS NULL) OR (((p_value #>> '{}'::text[]))::numeric <= p_max))) WHEN 'boolean'::text THEN (jsonb_typeof(p_value) = 'boolean'::text) WHEN 'text'::text THEN ((jsonb_typeof(p_value) = 'string'::text) AND ((p_allowed IS NULL) OR ((p_value #>> '{}'::text[]) = ANY (p_allowed)))) ELSE false END;
COMMENT ON FUNCTION edm.config_value_ok(text,jsonb,numeric,numeric,text[]) IS 'True when a config value has the declared type and lies within its bounds or allowed values. Backs the CHECK on edm.config.';
REVOKE ALL ON FUNCTION edm.config_value_ok(text,jsonb,numeric,numeric,text[]) FROM PUBLIC;

CREATE FUNCTION edm.job_http_allow_ok(p_value text)
 RETURNS boolean
 LANGUAGE plpgsql
 IMMUTABLE
AS $function$
DECLARE
  v_doc   jsonb;
  v_list  jsonb;
  v_entry jsonb;
BEGIN
  BEGIN
    v_doc := p_value::jsonb;
  EXCEPTION WHEN others THEN
    RETURN false;
  END;
  IF jsonb_typeof(v_doc) <> 'object'
     OR EXISTS (SELECT 1 FROM jsonb_object_keys(v_doc) k WHERE k NOT IN ('all', 'platform', 'users', 'tenants'))
     OR (v_doc ? 'users' AND jsonb_typeof(v_doc -> 'users') <> 'object')
     OR (v_doc ? 'tenants' AND jsonb_typeof(v_doc -> 'tenants') <> 'object') THEN
    RETURN false;
  END IF;
  FOR v_list IN
    SELECT v_doc -> 'all' WHERE v_doc ? 'all'
    UNION ALL SELECT v_doc -> 'platform' WHERE v_doc ? 'platform'
    UNION ALL SELECT t.value FROM jsonb_each(coalesce(v_doc -> 'users', '{}')) t
    UNION ALL SELECT t.value FROM jsonb_each(coalesce(v_doc -> 'tenants', '{}')) t
  LOOP
    IF jsonb_typeof(v_list) <> 'array' THEN
      RETURN false;
    END IF;
    FOR v_entry IN SELECT e FROM jsonb_array_elements(v_list) e LOOP
      IF jsonb_typeof(v_entry) <> 'string' THEN
        RETURN false;
      END IF;
      CONTINUE WHEN lower(btrim(v_entry #>> '{}'))
        ~ '^(\*\.)?[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$'
        AND lower(btrim(v_entry #>> '{}')) !~ '^[0-9.]+$';
      BEGIN
        PERFORM (v_entry #>> '{}')::cidr;
      EXCEPTION WHEN others THEN
        BEGIN
          PERFORM (v_entry #>> '{}')::inet;
        EXCEPTION WHEN others THEN
          RETURN false;
        END;
      END;
    END LOOP;
  END LOOP;
  RETURN true;
END;
$function$;
COMMENT ON FUNCTION edm.job_http_allow_ok(text) IS 'True when p_value is a valid jobs.http_allow setting: a JSON object {"all": [...], "platform": [...], "users": {"<user>": [...]}} whose lists hold networks (10.20.0.0/16, 127.0.0.1, fd00::/8) or host names (crm.intranet.example, *.intranet.example); "tenants", the older word for "users", is read too. Backs a CHECK on edm.config.';
REVOKE ALL ON FUNCTION edm.job_http_allow_ok(text) FROM PUBLIC;

CREATE FUNCTION edm.job_user_list_ok(p_value text)
 RETURNS boolean
 LANGUAGE plpgsql
 IMMUTABLE
AS $function$
DECLARE
  v_doc jsonb;
BEGIN
  BEGIN
    v_doc := p_value::jsonb;
  EXCEPTION WHEN others THEN
    RETURN false;
  END;
  RETURN jsonb_typeof(v_doc) = 'array'
     AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v_doc) e
                     WHERE jsonb_typeof(e) <> 'string' OR length(e #>> '{}') = 0);
END;
$function$;
COMMENT ON FUNCTION edm.job_user_list_ok(text) IS 'True when p_value is a JSON array of non-empty user ids (the jobs.shell_users setting; "*" stands for every user). Backs a CHECK on edm.config.';
REVOKE ALL ON FUNCTION edm.job_user_list_ok(text) FROM PUBLIC;

CREATE TABLE edm.config (
  key text NOT NULL,
  value jsonb NOT NULL,
  default_value jsonb NOT NULL,
  category text NOT NULL,
  value_type text NOT NULL,
  min_value numeric,
  max_value numeric,
  allowed_values text[],
  unit text,
  description text NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  updated_by text,
  CONSTRAINT config_pkey PRIMARY KEY (key),
  CONSTRAINT config_default_in_range CHECK (edm.config_value_ok(value_type, default_value, min_value, max_value, allowed_values)),
  CONSTRAINT config_jobs_security_values CHECK (
CASE key
    WHEN 'jobs.http_allow'::text THEN edm.job_http_allow_ok((value #>> '{}'::text[]))
    WHEN 'jobs.shell_users'::text THEN edm.job_user_list_ok((value #>> '{}'::text[]))
    ELSE true
END),
  CONSTRAINT config_key_check CHECK ((key ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$'::text)),
  CONSTRAINT config_value_in_range CHECK (edm.config_value_ok(value_type, value, min_value, max_value, allowed_values)),
  CONSTRAINT config_value_type_check CHECK ((value_type = ANY (ARRAY['integer'::text, 'number'::text, 'boolean'::text, 'text'::text])))
);
COMMENT ON TABLE edm.config IS 'Typed, constrained settings read by SQL functions and dispatchers. Change with edm.config_set(); running dispatchers reload on NOTIFY edm_config.';
COMMENT ON COLUMN edm.config.key IS 'Dotted setting name, e.g. queue.central_batch_size.';
COMMENT ON COLUMN edm.config.value IS 'Current value as JSON (number, boolean or string).';
COMMENT ON COLUMN edm.config.default_value IS 'Value shipped with edm-sched.';
COMMENT ON COLUMN edm.config.category IS 'Group of the setting: queue, service, monitoring, retention, jobs.';
COMMENT ON COLUMN edm.config.value_type IS 'integer, number, boolean or text.';
COMMENT ON COLUMN edm.config.min_value IS 'Inclusive lower bound for numbers, NULL when unbounded.';
COMMENT ON COLUMN edm.config.max_value IS 'Inclusive upper bound for numbers, NULL when unbounded.';
COMMENT ON COLUMN edm.config.allowed_values IS 'Allowed strings for text settings, NULL when free.';
COMMENT ON COLUMN edm.config.unit IS 'Unit of the value (seconds, percent, rows), for display.';
COMMENT ON COLUMN edm.config.description IS 'What the setting controls.';
COMMENT ON COLUMN edm.config.updated_at IS 'When the value last changed.';
COMMENT ON COLUMN edm.config.updated_by IS 'Actor of the last change, as given to edm.config_set().';
COMMENT ON CONSTRAINT config_jobs_security_values ON edm.config IS 'jobs.http_allow and jobs.shell_users hold well-formed JSON text (edm.job_http_allow_ok, edm.job_user_list_ok).';
INSERT INTO edm.config (key, value, default_value, category, value_type, min_value, max_value, allowed_values, unit, description, updated_by) VALUES
  ('jobs.execution_retention_days', '30', '30', 'jobs', 'integer', '1', '3650', NULL, 'days', 'Finished job executions older than this are deleted by edm.job_purge_executions() (runners call it every jobs.maintenance_interval).', NULL),
  ('jobs.http_allow', '"{}"', '"{}"', 'jobs', 'text', NULL, NULL, NULL, NULL, 'Destinations opened to http jobs despite the outbound guard (which refuses loopback, private, carrier-grade NAT, link-local, multicast, reserved and unspecified addresses): JSON text {"all": [...], "platform": [...], "users": {"<user>": [...]}} of networks or host names ("tenants" is the older word for "users"). See docs/jobs.md#security.', NULL),
  ('jobs.lease_margin', '30', '30', 'jobs', 'integer', '5', '3600', NULL, 'seconds', 'Time after a run''s timeout before its lease expires and the run counts as lost (its worker crashed).', NULL),
  ('jobs.maintenance_interval', '300', '300', 'jobs', 'integer', '10', '86400', NULL, 'seconds', 'How often runners purge expired execution history (one runner at a time).', NULL),
  ('jobs.max_catchup_runs', '100', '100', 'jobs', 'integer', '1', '10000', NULL, 'runs', 'Most missed runs of one job replayed after downtime under the run_all misfire policy (the most recent ones).', NULL),
  ('jobs.max_jobs_per_user', '1000', '1000', 'jobs', 'integer', '1', '1000000', NULL, 'jobs', 'Most jobs one user may own; creating more raises QUOTA_EXCEEDED.', NULL),
  ('jobs.max_running_per_user', '0', '0', 'jobs', 'integer', '0', '100000', NULL, 'executions', 'Most executions of one user''s jobs running at once, all kinds together and across all runners (0: no limit). Executions over it wait, pending.', NULL),
  ('jobs.shell_enabled', 'false', 'false', 'jobs', 'boolean', NULL, NULL, NULL, NULL, 'Whether shell-command jobs may be created or edited. Runners additionally need allow_shell=True from the host to execute them.', NULL),
  ('jobs.shell_users', '"[]"', '"[]"', 'jobs', 'text', NULL, NULL, NULL, NULL, 'Users whose jobs may be shell commands, as JSON text ["acme", ...] ("*": every user). A user''s shell job also needs jobs.shell_enabled, and runners allow_shell=True.', NULL),
  ('monitoring.metrics_retention_days', '30', '30', 'monitoring', 'integer', '7', '90', NULL, 'days', 'Days of send events and metric roll-ups kept.', NULL),
  ('monitoring.quota_alert_percent', '90', '90', 'monitoring', 'integer', '50', '100', NULL, 'percent', 'Share of a service''s daily quota that raises an alert.', NULL),
  ('monitoring.stuck_task_threshold', '600', '600', 'monitoring', 'integer', '300', '1800', NULL, 'seconds', 'A sending task without progress for this long is flagged stuck.', NULL),
  ('monitoring.wait_critical', '600', '600', 'monitoring', 'integer', '60', '7200', NULL, 'seconds', 'First-send wait of a task that raises a critical alert.', NULL),
  ('monitoring.wait_emergency', '1800', '1800', 'monitoring', 'integer', '60', '86400', NULL, 'seconds', 'First-send wait of a task that raises an emergency alert.', NULL),
  ('monitoring.wait_warning', '300', '300', 'monitoring', 'integer', '60', '3600', NULL, 'seconds', 'First-send wait of a task that raises a warning alert.', NULL),
  ('queue.central_batch_size', '200', '200', 'queue', 'integer', '10', '1000', NULL, 'subtasks', 'Largest batch one claim call takes: up to this many slots over the ready services, each service at most what its limits allow within the lookahead. A call costs a part that does not depend on its size (ranking the ready services, reading the rotation head), so larger batches cost less per subtask where much is ready at once (docs/performance.md, "S1 after session 10").', NULL),
  ('queue.concurrent_workers', '10', '10', 'queue', 'integer', '1', '50', NULL, 'sends', 'Sends a dispatcher runs in parallel when run_dispatcher() gets no concurrency argument.', NULL),
  ('queue.max_attempts', '5', '5', 'queue', 'integer', '1', '20', NULL, 'attempts', 'Attempts after which a transient failure becomes permanent.', NULL),
  ('queue.pending_retry_interval', '60', '60', 'queue', 'integer', '30', '300', NULL, 'seconds', 'Base delay before a transient failure is retried; doubles with each attempt.', NULL),
  ('queue.retry_backoff_max', '3600', '3600', 'queue', 'integer', '60', '86400', NULL, 'seconds', 'Cap on the retry delay of a transient failure.', NULL),
  ('queue.service_hold_seconds', '2', '2', 'queue', 'integer', '1', '60', NULL, 'seconds', 'A service claimed by a dispatcher is held by it for this long after its last slot (and while its sends run), so one process paces the service''s sends on the wire.', NULL),
  ('queue.service_reservation_timeout', '30', '30', 'queue', 'integer', '10', '120', NULL, 'seconds', 'Lease length of a claimed subtask; an expired lease is returned to pending by the sweep.', NULL),
  ('queue.shaping_arrival_margin_ms', '250', '250', 'queue', 'integer', '0', '10000', NULL, 'ms', 'A rate limit of a layer several lanes send against (global, site, service_site, user, task) counts a send that found its bucket idle as arriving this long after its slot: a provider''s bucket starts from the send''s arrival, and a send of one lane that starts late (a stall of the sending machine) must not make another lane''s on-time send early as the provider counts. Capped at each limit''s burst tolerance, (burst - 1) * window / max_count, so it costs nothing while the limit binds, an idle bucket admits up to margin / (window / max_count) fewer sends at once, and a limit without a burst gets none. 250 ms covers the stalls measured on a loaded two-core machine (docs/performance.md, traffic shaping).', NULL),
  ('queue.slot_lead_ms', '100', '100', 'queue', 'integer', '0', '5000', NULL, 'milliseconds', 'A paced service (an interval or an extra limit) claimed while idle gets its first slot this long after the claim (at most the lookahead), so the dispatcher has rendered the message and opened the connection by then: a first slot already past when the claim reaches the dispatcher makes its send late and the next one closer than the interval on the wire.', NULL),
  ('queue.slot_lookahead_ms', '250', '250', 'queue', 'integer', '0', '5000', NULL, 'milliseconds', 'How long before its slot a send may be claimed: the dispatcher renders the message and opens the connection meanwhile, and starts the SMTP transaction at the slot.', NULL),
  ('queue.small_pool_grantees', '100', '100', 'queue', 'integer', '0', '10000', NULL, 'users', 'A service granted to at most this many users finds its next user from its own grants; a larger one from the head of the user rotation. Changes speed only, never which user is chosen.', NULL),
  ('queue.transactional_share', '0.8', '0.8', 'queue', 'number', '0', '1', NULL, 'fraction', 'The most of a service''s slots transactional tasks may take ahead of bulk work while bulk work waits for that service (0.8: at most 4 transactional slots in a row, then a bulk one). 1 lets transactional work take every slot; 0 claims it in the fair rotation like bulk work.', NULL),
  ('reputation.bounce_pause_pct', '5', '5', 'reputation', 'number', '0', '100', NULL, 'percent', 'Hard-bounce rate that pauses the user''s bulk tasks or disables the service.', NULL),
  ('reputation.bounce_warn_pct', '2', '2', 'reputation', 'number', '0', '100', NULL, 'percent', 'Hard-bounce rate (hard bounces / sends) that raises a warning alert.', NULL),
  ('reputation.check_interval', '60', '60', 'reputation', 'integer', '5', '3600', NULL, 'seconds', 'Least time between two runs of the breaker (it runs from the sweeps).', NULL),
  ('reputation.complaint_pause_pct', '0.3', '0.3', 'reputation', 'number', '0', '100', NULL, 'percent', 'Complaint rate that pauses the user''s bulk tasks or disables the service (Gmail and Yahoo: never reach 0.3 %).', NULL),
  ('reputation.complaint_warn_pct', '0.1', '0.1', 'reputation', 'number', '0', '100', NULL, 'percent', 'Complaint rate (complaints / sends) that raises a warning alert (Gmail: stay under 0.1 %).', NULL),
  ('reputation.enabled', 'true', 'true', 'reputation', 'boolean', NULL, NULL, NULL, NULL, 'False turns the breaker off (rates are still shown in edm.reputation_status).', NULL),
  ('reputation.min_sends', '1000', '1000', 'reputation', 'integer', '1', '10000000', NULL, 'sends', 'Sends in the window below which no rate is judged: 1 bounce in 3 sends is chance, not a reputation.', NULL),
  ('reputation.window_hours', '24', '24', 'reputation', 'integer', '1', '720', NULL, 'hours', 'Rolling window of the bounce and complaint rates (whole hours: sends are counted from the hourly roll-up).', NULL),
  ('retention.finished_task_days', '30', '30', 'retention', 'integer', '1', '3650', NULL, 'days', 'Completed, cancelled and failed tasks (with their subtasks) are deleted this long after they finished.', NULL),
  ('retention.finished_tasks_per_sweep', '20', '20', 'retention', 'integer', '1', '10000', NULL, 'tasks', 'Most finished tasks one sweep deletes, so a sweep stays short.', NULL),
  ('retention.shaping_action_days', '30', '30', 'retention', 'integer', '1', '3650', NULL, 'days', 'Rows of edm.shaping_actions (the reply rules applied) are deleted this long after they were recorded, once their action has ended (edm.trim_shaping_actions, a step of every sweep).', NULL),
  ('service.backoff_base', '30', '30', 'service', 'integer', '1', '600', NULL, 'seconds', 'First back-off of a service after a service-level failure; doubles with each consecutive one.', NULL),
  ('service.backoff_max', '1800', '1800', 'service', 'integer', '60', '86400', NULL, 'seconds', 'Cap on the back-off of a failing service.', NULL),
  ('sweep.interval', '5', '5', 'sweep', 'integer', '1', '300', NULL, 'seconds', 'How often the elected dispatcher runs the sweeps.', NULL);

CREATE TABLE edm.config_renamed (
  old_key text NOT NULL,
  key text NOT NULL,
  renamed_in integer NOT NULL,
  CONSTRAINT config_renamed_pkey PRIMARY KEY (old_key),
  CONSTRAINT config_renamed_key_fkey FOREIGN KEY (key) REFERENCES edm.config(key) ON UPDATE CASCADE
);
COMMENT ON TABLE edm.config_renamed IS 'Settings renamed by a migration: edm.config_set and the Python config API accept the old name (deprecated) for the new one; edm.config_key maps an old name to the new.';
COMMENT ON COLUMN edm.config_renamed.old_key IS 'The name the setting had.';
COMMENT ON COLUMN edm.config_renamed.key IS 'Its name now (edm.config.key).';
COMMENT ON COLUMN edm.config_renamed.renamed_in IS 'The migration that renamed it.';
INSERT INTO edm.config_renamed (old_key, key, renamed_in) VALUES
  ('jobs.max_jobs_per_tenant', 'jobs.max_jobs_per_user', '21'),
  ('jobs.max_running_per_tenant', 'jobs.max_running_per_user', '21'),
  ('jobs.shell_tenants', 'jobs.shell_users', '21');

CREATE FUNCTION edm.config_key(p_key text)
 RETURNS text
 LANGUAGE sql
 STABLE
RETURN COALESCE((SELECT r.key FROM edm.config_renamed r WHERE (r.old_key = config_key.p_key)), p_key);
COMMENT ON FUNCTION edm.config_key(text) IS 'The current name of setting p_key: itself, or the new name of a renamed setting (edm.config_renamed).';
REVOKE ALL ON FUNCTION edm.config_key(text) FROM PUBLIC;

CREATE FUNCTION edm.config_int(p_key text)
 RETURNS integer
 LANGUAGE plpgsql
 STABLE
AS $function$
BEGIN
  RETURN (SELECT (c.value #>> '{}')::numeric::integer FROM edm.config c WHERE c.key = p_key);
END;
$function$;
COMMENT ON FUNCTION edm.config_int(text) IS 'Integer value of config key p_key (NULL when absent).';
REVOKE ALL ON FUNCTION edm.config_int(text) FROM PUBLIC;

CREATE FUNCTION edm.config_num(p_key text)
 RETURNS numeric
 LANGUAGE plpgsql
 STABLE
AS $function$
BEGIN
  RETURN (SELECT (c.value #>> '{}')::numeric FROM edm.config c WHERE c.key = p_key);
END;
$function$;
COMMENT ON FUNCTION edm.config_num(text) IS 'Numeric value of config key p_key (NULL when absent).';
REVOKE ALL ON FUNCTION edm.config_num(text) FROM PUBLIC;

CREATE FUNCTION edm.config_set(p_key text, p_value jsonb, p_actor text DEFAULT NULL::text)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  c edm.config;
BEGIN
  p_key := edm.config_key(p_key);  -- a renamed setting answers to its old name
  SELECT * INTO c FROM edm.config WHERE key = p_key FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown config key %', quote_literal(p_key) USING ERRCODE = 'ED001';
  END IF;
  IF p_value IS NULL OR NOT edm.config_value_ok(c.value_type, p_value, c.min_value, c.max_value,
                                                c.allowed_values) THEN
    RAISE EXCEPTION 'config % refused: % is not %', p_key, coalesce(p_value::text, 'NULL'),
      CASE c.value_type
        WHEN 'integer' THEN 'an integer'
        WHEN 'number' THEN 'a number'
        WHEN 'boolean' THEN 'true or false'
        ELSE 'a string' END
      || CASE WHEN c.min_value IS NOT NULL OR c.max_value IS NOT NULL
              THEN format(' between %s and %s', coalesce(c.min_value::text, '-inf'),
                          coalesce(c.max_value::text, '+inf'))
              ELSE '' END
      || CASE WHEN c.allowed_values IS NOT NULL
              THEN ' among ' || array_to_string(c.allowed_values, ', ') ELSE '' END
      USING ERRCODE = 'ED006';
  END IF;
  IF p_actor IS NOT NULL THEN  -- the audit log's actor for this transaction
    PERFORM set_config('edm.actor', p_actor, true);
  END IF;
  UPDATE edm.config SET value = p_value, updated_at = now(), updated_by = p_actor
  WHERE key = p_key;
  PERFORM pg_notify('edm_config', p_key);
  RETURN p_value;
END;
$function$;
COMMENT ON FUNCTION edm.config_set(text,jsonb,text) IS 'Sets config p_key after checking type and range (ED006 with the allowed range when refused, ED001 for an unknown key) and notifies running dispatchers (NOTIFY edm_config) so they reload. The old name of a renamed setting (edm.config_renamed) sets the new one.';
REVOKE ALL ON FUNCTION edm.config_set(text,jsonb,text) FROM PUBLIC;

CREATE TRIGGER config_audit AFTER UPDATE ON edm.config FOR EACH ROW WHEN ((old.value IS DISTINCT FROM new.value)) EXECUTE FUNCTION edm.audit_row('config');

-- ==========================================================================
-- Users, services and grants
-- Users (the host platform's tenants), sending accounts, and who may send through what.
-- ==========================================================================

CREATE TABLE edm.users (
  user_id text NOT NULL,
  display_name text,
  quota_limit bigint,
  quota_used bigint DEFAULT 0 NOT NULL,
  claimable_tasks integer DEFAULT 0 NOT NULL,
  last_served_seq bigint DEFAULT 0 NOT NULL,
  last_served_at timestamp with time zone,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  paused_reason text,
  reputation_since timestamp with time zone,
  has_limits boolean DEFAULT false NOT NULL,
  CONSTRAINT users_pkey PRIMARY KEY (user_id),
  CONSTRAINT users_claimable_tasks_check CHECK ((claimable_tasks >= 0)),
  CONSTRAINT users_display_name_check CHECK ((length(display_name) <= 200)),
  CONSTRAINT users_quota_limit_check CHECK ((quota_limit >= 0)),
  CONSTRAINT users_quota_respected CHECK (((quota_limit IS NULL) OR (quota_used <= quota_limit))),
  CONSTRAINT users_quota_used_check CHECK ((quota_used >= 0)),
  CONSTRAINT users_user_id_check CHECK ((((length(user_id) >= 1) AND (length(user_id) <= 128)) AND (user_id !~ '[[:cntrl:]]'::text)))
);
COMMENT ON TABLE edm.users IS 'Tenants of the host platform. user_id is the host''s own id as text (an integer or UUID maps to its canonical string), so no id translation table is needed.';
COMMENT ON COLUMN edm.users.user_id IS 'The host backend''s tenant id, as text (1–128 characters, no control characters).';
COMMENT ON COLUMN edm.users.display_name IS 'Optional human-readable name for views and the CLI.';
COMMENT ON COLUMN edm.users.quota_limit IS 'Most recipients this user may ever have reserved; NULL is unlimited.';
COMMENT ON COLUMN edm.users.quota_used IS 'Recipients reserved by this user''s tasks (refunded when unsent work is cancelled). The CHECK keeps it within quota_limit (I3).';
COMMENT ON COLUMN edm.users.claimable_tasks IS 'Number of this user''s tasks with claimable work; maintained by a trigger on edm.tasks.claimable. Users with 0 are left out of the rotation index.';
COMMENT ON COLUMN edm.users.last_served_seq IS 'Value of edm.serve_seq at this user''s latest claim; fair rotation serves the lowest first (0 = never served).';
COMMENT ON COLUMN edm.users.last_served_at IS 'Time of this user''s latest claim.';
COMMENT ON COLUMN edm.users.created_at IS 'When the user was first seen.';
COMMENT ON COLUMN edm.users.paused_reason IS 'Why the reputation breaker paused this user''s bulk tasks, NULL otherwise; while set, the user''s bulk tasks do not start. Cleared by edm.reputation_resume_user.';
COMMENT ON COLUMN edm.users.reputation_since IS 'Start of the user''s reputation window after a resume: events before it no longer count.';
COMMENT ON COLUMN edm.users.has_limits IS 'True when edm.shaping_limits has user-scope rows for this user (kept by a trigger); the claim reads them only then.';
CREATE INDEX users_limited_idx ON edm.users USING btree (user_id) WHERE has_limits;
COMMENT ON INDEX edm.users_limited_idx IS 'Users with user limits: one probe tells the claim whether the layer is in use.';
CREATE INDEX users_rotation_idx ON edm.users USING btree (last_served_seq, user_id) WHERE (claimable_tasks > 0);
COMMENT ON INDEX edm.users_rotation_idx IS 'Fair rotation: users with claimable work, least recently served first.';

CREATE TABLE edm.services (
  service_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  name text NOT NULL,
  transport text DEFAULT 'smtp'::text NOT NULL,
  settings jsonb DEFAULT '{}'::jsonb NOT NULL,
  credential_ref text,
  from_addresses text[] NOT NULL,
  interval_ms bigint NOT NULL,
  daily_quota integer NOT NULL,
  quota_tz text DEFAULT 'UTC'::text NOT NULL,
  enabled boolean DEFAULT true NOT NULL,
  health text DEFAULT 'healthy'::text NOT NULL,
  consecutive_failures integer DEFAULT 0 NOT NULL,
  backoff_until timestamp with time zone,
  last_error text,
  last_sent_at timestamp with time zone,
  quota_day date,
  sent_today integer DEFAULT 0 NOT NULL,
  quota_exhausted_until timestamp with time zone,
  next_available_at timestamp with time zone GENERATED ALWAYS AS (COALESCE(GREATEST(edm.ts_add_ms(last_sent_at, interval_ms), backoff_until, quota_exhausted_until), '-infinity'::timestamp with time zone)) STORED NOT NULL,
  total_sent bigint DEFAULT 0 NOT NULL,
  total_failed bigint DEFAULT 0 NOT NULL,
  success_rate double precision GENERATED ALWAYS AS (
CASE
    WHEN ((total_sent + total_failed) = 0) THEN (1.0)::double precision
    ELSE ((total_sent)::double precision / ((total_sent + total_failed))::double precision)
END) STORED NOT NULL,
  avg_response_ms double precision,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  held_by text,
  held_until timestamp with time zone,
  has_limits boolean DEFAULT false NOT NULL,
  paused_reason text,
  reputation_since timestamp with time zone,
  tx_run integer DEFAULT 0 NOT NULL,
  site_rules_until timestamp with time zone,
  CONSTRAINT services_pkey PRIMARY KEY (service_id),
  CONSTRAINT services_name_key UNIQUE (name),
  CONSTRAINT services_consecutive_failures_check CHECK ((consecutive_failures >= 0)),
  CONSTRAINT services_credential_ref_check CHECK ((length(credential_ref) <= 500)),
  CONSTRAINT services_daily_quota_check CHECK ((daily_quota >= 0)),
  CONSTRAINT services_from_addresses_check CHECK (((cardinality(from_addresses) >= 1) AND (cardinality(from_addresses) <= 100))),
  CONSTRAINT services_health_check CHECK ((health = ANY (ARRAY['healthy'::text, 'degraded'::text, 'backoff'::text]))),
  CONSTRAINT services_interval_ms_check CHECK (((interval_ms >= 0) AND (interval_ms <= 86400000))),
  CONSTRAINT services_name_check CHECK ((((length(name) >= 1) AND (length(name) <= 200)) AND (name !~ '[[:cntrl:]]'::text))),
  CONSTRAINT services_sent_today_check CHECK ((sent_today >= 0)),
  CONSTRAINT services_settings_check CHECK (((jsonb_typeof(settings) = 'object'::text) AND (NOT (settings ?| ARRAY['password'::text, 'secret'::text, 'api_key'::text, 'token'::text, 'passwd'::text])))),
  CONSTRAINT services_transport_check CHECK ((transport ~ '^[a-z][a-z0-9_]{0,31}$'::text)),
  CONSTRAINT services_tx_run_check CHECK ((tx_run >= 0))
);
COMMENT ON TABLE edm.services IS 'Sending accounts (SMTP logins or ESP API keys). Readiness = enabled AND next_available_at <= now; see edm.service_is_ready().';
COMMENT ON COLUMN edm.services.service_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.services.name IS 'Unique human name of the account.';
COMMENT ON COLUMN edm.services.transport IS 'Transport kind the dispatcher uses: smtp, null, or a host-registered name.';
COMMENT ON COLUMN edm.services.settings IS 'Transport settings (host, port, security, username...). Never secrets: keys such as password are refused by a CHECK.';
COMMENT ON COLUMN edm.services.credential_ref IS 'Reference handed to the host''s credential resolver (an env var name, a vault path); the secret itself is never stored here.';
COMMENT ON COLUMN edm.services.from_addresses IS 'Sender addresses this account may use; the first is the default.';
COMMENT ON COLUMN edm.services.interval_ms IS 'Least time between two send starts on this account, in milliseconds (I2).';
COMMENT ON COLUMN edm.services.daily_quota IS 'Most sends per quota day (I3).';
COMMENT ON COLUMN edm.services.quota_tz IS 'Time zone whose midnight starts a new quota day for this account.';
COMMENT ON COLUMN edm.services.enabled IS 'False takes the account out of rotation at once.';
COMMENT ON COLUMN edm.services.health IS 'healthy; degraded (recent failures); backoff (service-level failure, waiting until backoff_until).';
COMMENT ON COLUMN edm.services.consecutive_failures IS 'Service-level failures in a row; drives the growing back-off.';
COMMENT ON COLUMN edm.services.backoff_until IS 'No claims on this account before this time after a service-level failure.';
COMMENT ON COLUMN edm.services.last_error IS 'Last service-level error text (never contains credentials).';
COMMENT ON COLUMN edm.services.last_sent_at IS 'Slot of the latest claimed send (the instant it may start on the wire); the interval is counted from here.';
COMMENT ON COLUMN edm.services.quota_day IS 'Local date (in quota_tz) that sent_today counts.';
COMMENT ON COLUMN edm.services.sent_today IS 'Sends started on quota_day.';
COMMENT ON COLUMN edm.services.quota_exhausted_until IS 'When a limit next admits a send once the daily quota or another limit (edm.service_limits) is used up; NULL otherwise. Part of next_available_at.';
COMMENT ON COLUMN edm.services.next_available_at IS 'Generated: the earliest time this account may start a send = greatest(last_sent_at + interval, backoff_until, quota_exhausted_until); -infinity when nothing holds it back.';
COMMENT ON COLUMN edm.services.total_sent IS 'Sends accepted by the provider, all time.';
COMMENT ON COLUMN edm.services.total_failed IS 'Send attempts that failed (transient or permanent), all time.';
COMMENT ON COLUMN edm.services.success_rate IS 'Generated: total_sent / (total_sent + total_failed), 1.0 before any attempt.';
COMMENT ON COLUMN edm.services.avg_response_ms IS 'Exponentially weighted mean of the provider response time, in milliseconds.';
COMMENT ON COLUMN edm.services.created_at IS 'When the account was added.';
COMMENT ON COLUMN edm.services.updated_at IS 'When the account''s settings last changed.';
COMMENT ON COLUMN edm.services.held_by IS 'Dispatcher that holds this service (it claimed its latest slots); other dispatchers leave the service alone until held_until.';
COMMENT ON COLUMN edm.services.held_until IS 'End of the hold: queue.service_hold_seconds after the latest slot, extended while the holder''s sends run (edm.renew_leases).';
COMMENT ON COLUMN edm.services.has_limits IS 'True when edm.service_limits has rows for this service (kept by a trigger); the claim reads them only then.';
COMMENT ON COLUMN edm.services.paused_reason IS 'Why the reputation breaker disabled the service (enabled = false), NULL otherwise. Cleared by edm.reputation_resume_service.';
COMMENT ON COLUMN edm.services.reputation_since IS 'Start of the service''s reputation window after a resume: events before it no longer count.';
COMMENT ON COLUMN edm.services.tx_run IS 'Transactional slots the service gave ahead of bulk work in a row (reset by a slot given in the fair rotation); with queue.transactional_share it decides when bulk work gets the next slot.';
COMMENT ON COLUMN edm.services.site_rules_until IS 'Until when the claim must read this service''s own site rules: infinity while it has (service, site) limits in edm.shaping_limits, else the latest until of its rows in edm.site_suspensions, else NULL. Kept by triggers on both tables (edm.service_site_rules_sync).';
CREATE INDEX services_ready_idx ON edm.services USING btree (next_available_at) WHERE enabled;
COMMENT ON INDEX edm.services_ready_idx IS 'Ready services: enabled ones by the time they become available.';

CREATE TABLE edm.grants (
  service_id bigint NOT NULL,
  user_id text NOT NULL,
  priority integer DEFAULT 0 NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT grants_pkey PRIMARY KEY (service_id, user_id),
  CONSTRAINT grants_service_id_fkey FOREIGN KEY (service_id) REFERENCES edm.services(service_id) ON DELETE CASCADE,
  CONSTRAINT grants_user_id_fkey FOREIGN KEY (user_id) REFERENCES edm.users(user_id) ON DELETE CASCADE,
  CONSTRAINT grants_priority_check CHECK (((priority >= '-1000'::integer) AND (priority <= 1000)))
);
COMMENT ON TABLE edm.grants IS 'Which user may send through which service. A user''s lower-priority grants are overflow: used only while none of its higher-priority granted services is ready.';
COMMENT ON COLUMN edm.grants.service_id IS 'The service granted.';
COMMENT ON COLUMN edm.grants.user_id IS 'The user who may use it.';
COMMENT ON COLUMN edm.grants.priority IS 'Higher first: a user sends through its highest-priority ready services.';
COMMENT ON COLUMN edm.grants.created_at IS 'When the grant was made.';
CREATE INDEX grants_user_idx ON edm.grants USING btree (user_id, priority DESC, service_id);
COMMENT ON INDEX edm.grants_user_idx IS 'A user''s grants by priority; used by the priority-tier check of the claim.';

CREATE FUNCTION edm.services_check_settings()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_problem text;
BEGIN
  v_problem := edm.headers_problem(NEW.settings -> 'headers');
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'new row for relation "services" violates check constraint "services_headers_ok"'
      USING ERRCODE = 'check_violation', CONSTRAINT = 'services_headers_ok',
            SCHEMA = 'edm', TABLE = 'services', DETAIL = v_problem;
  END IF;
  IF NOT edm.is_valid_timezone(NEW.quota_tz) THEN
    RAISE EXCEPTION 'new row for relation "services" violates check constraint "services_quota_tz_check"'
      USING ERRCODE = 'check_violation', CONSTRAINT = 'services_quota_tz_check',
            SCHEMA = 'edm', TABLE = 'services',
            DETAIL = format('unknown time zone %s', quote_literal(NEW.quota_tz));
  END IF;
  RETURN NEW;
END;
$function$;
COMMENT ON FUNCTION edm.services_check_settings() IS 'Trigger on edm.services: refuses custom header fields edm.headers_problem finds wrong (check_violation, constraint services_headers_ok) and a quota_tz PostgreSQL does not know (services_quota_tz_check). A trigger rather than CHECK constraints, which would run on every update of the row (the claim and the completion update services on every call).';
REVOKE ALL ON FUNCTION edm.services_check_settings() FROM PUBLIC;

CREATE FUNCTION edm.upsert_user(p_user_id text, p_display_name text DEFAULT NULL::text, p_quota_limit bigint DEFAULT NULL::bigint)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  INSERT INTO edm.users (user_id, display_name, quota_limit)
  VALUES (p_user_id, p_display_name, p_quota_limit)
  ON CONFLICT (user_id) DO UPDATE
    SET display_name = coalesce(EXCLUDED.display_name, edm.users.display_name);
END;
$function$;
COMMENT ON FUNCTION edm.upsert_user(text,text,bigint) IS 'Creates user p_user_id (the host''s tenant id) or updates its display name. The quota is only set on creation; change it with edm.set_user_quota().';
REVOKE ALL ON FUNCTION edm.upsert_user(text,text,bigint) FROM PUBLIC;

CREATE FUNCTION edm.set_user_quota(p_user_id text, p_quota_limit bigint)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.set_user_quota(text,bigint) IS 'Sets the most recipients user p_user_id may have reserved (NULL = unlimited). Refused (ED002) below what is already reserved.';
REVOKE ALL ON FUNCTION edm.set_user_quota(text,bigint) FROM PUBLIC;

CREATE FUNCTION edm.create_service(p_name text, p_from_addresses text[], p_interval_ms bigint, p_daily_quota integer, p_transport text DEFAULT 'smtp'::text, p_settings jsonb DEFAULT '{}'::jsonb, p_credential_ref text DEFAULT NULL::text, p_quota_tz text DEFAULT 'UTC'::text, p_enabled boolean DEFAULT true)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.create_service(text,text[],bigint,integer,text,jsonb,text,text,boolean) IS 'Adds a sending account and returns its id. Settings must not contain secrets (credential_ref names the secret for the host resolver).';
REVOKE ALL ON FUNCTION edm.create_service(text,text[],bigint,integer,text,jsonb,text,text,boolean) FROM PUBLIC;

CREATE FUNCTION edm.update_service(p_service_id bigint, p_name text DEFAULT NULL::text, p_from_addresses text[] DEFAULT NULL::text[], p_interval_ms bigint DEFAULT NULL::bigint, p_daily_quota integer DEFAULT NULL::integer, p_settings jsonb DEFAULT NULL::jsonb, p_credential_ref text DEFAULT NULL::text, p_quota_tz text DEFAULT NULL::text, p_enabled boolean DEFAULT NULL::boolean, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.update_service(bigint,text,text[],bigint,integer,jsonb,text,text,boolean,timestamp with time zone) IS 'Changes the given fields of a service (NULL = unchanged). Disabling takes effect for the next claim; enabling wakes dispatchers.';
REVOKE ALL ON FUNCTION edm.update_service(bigint,text,text[],bigint,integer,jsonb,text,text,boolean,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.grant_service(p_service_id bigint, p_user_id text, p_priority integer DEFAULT 0)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  PERFORM edm.require_user(p_user_id);
  IF NOT EXISTS (SELECT 1 FROM edm.services s WHERE s.service_id = p_service_id) THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  INSERT INTO edm.grants (service_id, user_id, priority) VALUES (p_service_id, p_user_id, p_priority)
  ON CONFLICT (service_id, user_id) DO UPDATE SET priority = EXCLUDED.priority;
  PERFORM pg_notify('edm_wakeup', 'grant:' || p_service_id);
END;
$function$;
COMMENT ON FUNCTION edm.grant_service(bigint,text,integer) IS 'Lets user p_user_id send through service p_service_id (or changes the grant''s priority).';
REVOKE ALL ON FUNCTION edm.grant_service(bigint,text,integer) FROM PUBLIC;

CREATE FUNCTION edm.revoke_service(p_service_id bigint, p_user_id text)
 RETURNS boolean
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
BEGIN ATOMIC
 WITH d AS (
          DELETE FROM edm.grants g
           WHERE ((g.service_id = revoke_service.p_service_id) AND (g.user_id = revoke_service.p_user_id))
           RETURNING 1 AS "?column?"
         )
  SELECT (EXISTS ( SELECT 1
            FROM d)) AS "exists";
END;
COMMENT ON FUNCTION edm.revoke_service(bigint,text) IS 'Removes a grant; true when one existed. Subtasks already leased through it finish; no new claims use it.';
REVOKE ALL ON FUNCTION edm.revoke_service(bigint,text) FROM PUBLIC;

CREATE TRIGGER users_audit AFTER INSERT OR DELETE ON edm.users FOR EACH ROW EXECUTE FUNCTION edm.audit_row('user');

CREATE TRIGGER users_audit_upd AFTER UPDATE ON edm.users FOR EACH ROW WHEN (((old.quota_limit IS DISTINCT FROM new.quota_limit) OR (old.display_name IS DISTINCT FROM new.display_name))) EXECUTE FUNCTION edm.audit_row('user');

CREATE TRIGGER services_audit AFTER INSERT OR DELETE ON edm.services FOR EACH ROW EXECUTE FUNCTION edm.audit_row('service');

CREATE TRIGGER services_audit_upd AFTER UPDATE ON edm.services FOR EACH ROW WHEN ((((((((((old.name IS DISTINCT FROM new.name) OR (old.transport IS DISTINCT FROM new.transport)) OR (old.settings IS DISTINCT FROM new.settings)) OR (old.credential_ref IS DISTINCT FROM new.credential_ref)) OR (old.from_addresses IS DISTINCT FROM new.from_addresses)) OR (old.interval_ms IS DISTINCT FROM new.interval_ms)) OR (old.daily_quota IS DISTINCT FROM new.daily_quota)) OR (old.quota_tz IS DISTINCT FROM new.quota_tz)) OR (old.enabled IS DISTINCT FROM new.enabled))) EXECUTE FUNCTION edm.audit_row('service');

CREATE TRIGGER services_check_settings BEFORE INSERT OR UPDATE OF settings, quota_tz ON edm.services FOR EACH ROW EXECUTE FUNCTION edm.services_check_settings();
COMMENT ON TRIGGER services_check_settings ON edm.services IS 'Checks settings.headers and quota_tz when a row is inserted or either column is written.';

CREATE TRIGGER grants_audit AFTER INSERT OR DELETE OR UPDATE ON edm.grants FOR EACH ROW EXECUTE FUNCTION edm.audit_row('grant');

-- ==========================================================================
-- Contacts, tags and suppressions
-- Recipients known to a user, their tags, and addresses never to send to.
-- ==========================================================================

CREATE TABLE edm.contacts (
  contact_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  user_id text NOT NULL,
  email text NOT NULL,
  attributes jsonb DEFAULT '{}'::jsonb NOT NULL,
  tags text[] DEFAULT '{}'::text[] NOT NULL,
  unsubscribed boolean DEFAULT false NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT contacts_pkey PRIMARY KEY (contact_id),
  CONSTRAINT contacts_user_id_email_key UNIQUE (user_id, email),
  CONSTRAINT contacts_user_id_fkey FOREIGN KEY (user_id) REFERENCES edm.users(user_id) ON DELETE CASCADE,
  CONSTRAINT contacts_attributes_check CHECK ((jsonb_typeof(attributes) = 'object'::text)),
  CONSTRAINT contacts_email_check CHECK ((edm.is_valid_email(email) AND (email = edm.normalize_email(email))))
);
COMMENT ON TABLE edm.contacts IS 'A user''s address book. Tag membership lives only here, in contacts.tags.';
COMMENT ON COLUMN edm.contacts.contact_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.contacts.user_id IS 'Owner of the contact.';
COMMENT ON COLUMN edm.contacts.email IS 'Normalised address (see edm.normalize_email).';
COMMENT ON COLUMN edm.contacts.attributes IS 'Free-form variables for template rendering (first_name, plan...).';
COMMENT ON COLUMN edm.contacts.tags IS 'Tags of the contact: the one place tag membership is stored.';
COMMENT ON COLUMN edm.contacts.unsubscribed IS 'True when the contact opted out; never included in a task.';
COMMENT ON COLUMN edm.contacts.created_at IS 'When the contact was added.';
COMMENT ON COLUMN edm.contacts.updated_at IS 'When the contact last changed.';
CREATE INDEX contacts_tags_idx ON edm.contacts USING gin (tags);
COMMENT ON INDEX edm.contacts_tags_idx IS 'Tag rules of task expansion.';
CREATE INDEX contacts_user_idx ON edm.contacts USING btree (user_id, contact_id);
COMMENT ON INDEX edm.contacts_user_idx IS 'Chunked expansion walks one user''s contacts in contact_id order without passing over other tenants'' rows.';

CREATE TABLE edm.tags (
  user_id text NOT NULL,
  tag text NOT NULL,
  description text,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT tags_pkey PRIMARY KEY (user_id, tag),
  CONSTRAINT tags_user_id_fkey FOREIGN KEY (user_id) REFERENCES edm.users(user_id) ON DELETE CASCADE,
  CONSTRAINT tags_tag_check CHECK ((((length(tag) >= 1) AND (length(tag) <= 100)) AND (tag !~ '[[:cntrl:]]'::text)))
);
COMMENT ON TABLE edm.tags IS 'Tag catalogue of a user (names and descriptions); membership is in edm.contacts.tags.';
COMMENT ON COLUMN edm.tags.user_id IS 'Owner of the tag.';
COMMENT ON COLUMN edm.tags.tag IS 'Tag name.';
COMMENT ON COLUMN edm.tags.description IS 'What the tag means.';
COMMENT ON COLUMN edm.tags.created_at IS 'When the tag was created.';

CREATE TABLE edm.suppressions (
  suppression_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  user_id text,
  email text NOT NULL,
  reason text NOT NULL,
  source_subtask_id bigint,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT suppressions_pkey PRIMARY KEY (suppression_id),
  CONSTRAINT suppressions_user_id_email_key UNIQUE NULLS NOT DISTINCT (user_id, email),
  CONSTRAINT suppressions_user_id_fkey FOREIGN KEY (user_id) REFERENCES edm.users(user_id) ON DELETE CASCADE,
  CONSTRAINT suppressions_email_check CHECK (((email = edm.normalize_email(email)) AND (length(email) <= 254))),
  CONSTRAINT suppressions_reason_check CHECK ((reason = ANY (ARRAY['hard_bounce'::text, 'complaint'::text, 'unsubscribe'::text, 'manual'::text])))
);
COMMENT ON TABLE edm.suppressions IS 'Addresses never sent to: per user, or for everyone when user_id is NULL.';
COMMENT ON COLUMN edm.suppressions.suppression_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.suppressions.user_id IS 'User the suppression applies to; NULL = all users (e.g. a hard bounce).';
COMMENT ON COLUMN edm.suppressions.email IS 'Normalised address.';
COMMENT ON COLUMN edm.suppressions.reason IS 'hard_bounce, complaint, unsubscribe or manual.';
COMMENT ON COLUMN edm.suppressions.source_subtask_id IS 'Subtask whose permanent failure suppressed the address, if any.';
COMMENT ON COLUMN edm.suppressions.created_at IS 'When the address was suppressed.';
CREATE INDEX suppressions_email_idx ON edm.suppressions USING btree (email);
COMMENT ON INDEX edm.suppressions_email_idx IS 'Suppression lookups by address during expansion.';

CREATE FUNCTION edm.merge_staged_contacts(p_user_id text)
 RETURNS TABLE(inserted integer, updated integer)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.merge_staged_contacts(text) IS 'Upserts the contacts COPYed into the session''s temporary table edm_stage_contacts for user p_user_id: attributes merged, tags added, unsubscribes kept. Any invalid address refuses the whole batch (ED005).';
REVOKE ALL ON FUNCTION edm.merge_staged_contacts(text) FROM PUBLIC;

CREATE FUNCTION edm.set_contact_tags(p_user_id text, p_emails text[], p_add text[], p_remove text[])
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.set_contact_tags(text,text[],text[],text[]) IS 'Adds p_add and removes p_remove tags on the given contacts of p_user_id; returns how many contacts changed.';
REVOKE ALL ON FUNCTION edm.set_contact_tags(text,text[],text[],text[]) FROM PUBLIC;

CREATE FUNCTION edm.delete_tag(p_user_id text, p_tag text)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  UPDATE edm.contacts c SET tags = array_remove(c.tags, p_tag), updated_at = now()
  WHERE c.user_id = p_user_id AND c.tags @> ARRAY[p_tag];
  GET DIAGNOSTICS v_n = ROW_COUNT;
  DELETE FROM edm.tags t WHERE t.user_id = p_user_id AND t.tag = p_tag;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.delete_tag(text,text) IS 'Deletes tag p_tag of user p_user_id and removes it from every contact; returns how many contacts had it.';
REVOKE ALL ON FUNCTION edm.delete_tag(text,text) FROM PUBLIC;

CREATE FUNCTION edm.add_suppression(p_email text, p_reason text DEFAULT 'manual'::text, p_user_id text DEFAULT NULL::text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.add_suppression(text,text,text) IS 'Suppresses an address for user p_user_id, or for everyone when NULL. Pending subtasks already created still go; new tasks exclude it.';
REVOKE ALL ON FUNCTION edm.add_suppression(text,text,text) FROM PUBLIC;

CREATE FUNCTION edm.remove_suppression(p_email text, p_user_id text DEFAULT NULL::text)
 RETURNS boolean
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
BEGIN ATOMIC
 WITH d AS (
          DELETE FROM edm.suppressions s
           WHERE ((s.email = edm.normalize_email(remove_suppression.p_email)) AND (NOT (s.user_id IS DISTINCT FROM remove_suppression.p_user_id)))
           RETURNING 1 AS "?column?"
         )
  SELECT (EXISTS ( SELECT 1
            FROM d)) AS "exists";
END;
COMMENT ON FUNCTION edm.remove_suppression(text,text) IS 'Lifts a suppression; true when one existed.';
REVOKE ALL ON FUNCTION edm.remove_suppression(text,text) FROM PUBLIC;

CREATE FUNCTION edm.is_suppressed(p_user_id text, p_email text)
 RETURNS boolean
 LANGUAGE sql
 STABLE
RETURN (EXISTS (SELECT 1 FROM edm.suppressions s WHERE ((s.email = is_suppressed.p_email) AND ((s.user_id IS NULL) OR (s.user_id = is_suppressed.p_user_id)))));
COMMENT ON FUNCTION edm.is_suppressed(text,text) IS 'True when normalised address p_email is suppressed for user p_user_id (or for everyone). Task creation and expansion write the same predicate out as NOT EXISTS, which the planner turns into an anti-join (a call per contact is far slower).';
REVOKE ALL ON FUNCTION edm.is_suppressed(text,text) FROM PUBLIC;

-- ==========================================================================
-- Tasks and subtasks
-- Campaigns, their templates and one subtask per recipient; creation and lifecycle.
-- ==========================================================================

CREATE TABLE edm.tasks (
  task_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  user_id text NOT NULL,
  name text NOT NULL,
  status text DEFAULT 'draft'::text NOT NULL,
  prev_status text,
  priority integer DEFAULT 0 NOT NULL,
  scheduled_at timestamp with time zone DEFAULT now() NOT NULL,
  recipient_rule jsonb,
  total_count integer DEFAULT 0 NOT NULL,
  pending_count integer DEFAULT 0 NOT NULL,
  leased_count integer DEFAULT 0 NOT NULL,
  sent_count integer DEFAULT 0 NOT NULL,
  failed_count integer DEFAULT 0 NOT NULL,
  cancelled_count integer DEFAULT 0 NOT NULL,
  quota_reserved bigint DEFAULT 0 NOT NULL,
  template_count smallint DEFAULT 1 NOT NULL,
  expansion_cursor bigint,
  last_served_seq bigint DEFAULT 0 NOT NULL,
  claimable boolean GENERATED ALWAYS AS (((status = 'sending'::text) AND (pending_count > 0))) STORED NOT NULL,
  first_claimed_at timestamp with time zone,
  last_activity_at timestamp with time zone,
  started_at timestamp with time zone,
  finished_at timestamp with time zone,
  stuck_since timestamp with time zone,
  error text,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  pause_reason text,
  transactional boolean DEFAULT false NOT NULL,
  has_limits boolean DEFAULT false NOT NULL,
  CONSTRAINT tasks_pkey PRIMARY KEY (task_id),
  CONSTRAINT tasks_user_id_fkey FOREIGN KEY (user_id) REFERENCES edm.users(user_id),
  CONSTRAINT tasks_cancelled_count_check CHECK ((cancelled_count >= 0)),
  CONSTRAINT tasks_counters_add_up CHECK ((total_count = ((((pending_count + leased_count) + sent_count) + failed_count) + cancelled_count))),
  CONSTRAINT tasks_failed_count_check CHECK ((failed_count >= 0)),
  CONSTRAINT tasks_leased_count_check CHECK ((leased_count >= 0)),
  CONSTRAINT tasks_name_check CHECK ((((length(name) >= 1) AND (length(name) <= 300)) AND (name !~ '[[:cntrl:]]'::text))),
  CONSTRAINT tasks_pending_count_check CHECK ((pending_count >= 0)),
  CONSTRAINT tasks_priority_check CHECK (((priority >= '-100'::integer) AND (priority <= 100))),
  CONSTRAINT tasks_quota_reserved_check CHECK ((quota_reserved >= 0)),
  CONSTRAINT tasks_sent_count_check CHECK ((sent_count >= 0)),
  CONSTRAINT tasks_status_check CHECK ((status = ANY (ARRAY['draft'::text, 'expanding'::text, 'scheduled'::text, 'sending'::text, 'paused'::text, 'completed'::text, 'cancelled'::text, 'failed'::text]))),
  CONSTRAINT tasks_template_count_check CHECK (((template_count >= 1) AND (template_count <= 100))),
  CONSTRAINT tasks_total_count_check CHECK ((total_count >= 0)),
  CONSTRAINT tasks_transition_ok CHECK (edm.task_transition_ok(prev_status, status))
);
COMMENT ON TABLE edm.tasks IS 'Campaign sends. Counters are kept in the same transaction as every subtask change (I4); claimable is generated from status and pending_count.';
COMMENT ON COLUMN edm.tasks.task_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.tasks.user_id IS 'Owner (tenant).';
COMMENT ON COLUMN edm.tasks.name IS 'Campaign name.';
COMMENT ON COLUMN edm.tasks.status IS 'draft, expanding, scheduled, sending, paused, completed, cancelled or failed; transitions checked by tasks_transition_ok.';
COMMENT ON COLUMN edm.tasks.prev_status IS 'Status before the latest transition (set by trigger), so a CHECK can enforce the status machine.';
COMMENT ON COLUMN edm.tasks.priority IS 'Higher first among the same user''s tasks (-100..100); never lets a user overtake another user.';
COMMENT ON COLUMN edm.tasks.scheduled_at IS 'Claims start at this time.';
COMMENT ON COLUMN edm.tasks.recipient_rule IS 'How recipients were chosen: {"list": n} or a tag rule {"include_any":[],"include_all":[],"exclude":[]}.';
COMMENT ON COLUMN edm.tasks.total_count IS 'Subtasks of this task (= sum of the state counters).';
COMMENT ON COLUMN edm.tasks.pending_count IS 'Subtasks waiting to be claimed (including retries waiting for their back-off).';
COMMENT ON COLUMN edm.tasks.leased_count IS 'Subtasks claimed and not yet completed.';
COMMENT ON COLUMN edm.tasks.sent_count IS 'Subtasks sent.';
COMMENT ON COLUMN edm.tasks.failed_count IS 'Subtasks failed permanently.';
COMMENT ON COLUMN edm.tasks.cancelled_count IS 'Subtasks cancelled before being sent.';
COMMENT ON COLUMN edm.tasks.quota_reserved IS 'User quota reserved by this task and not yet refunded.';
COMMENT ON COLUMN edm.tasks.template_count IS 'Number of templates of the task; recipients are assigned templates in rotation.';
COMMENT ON COLUMN edm.tasks.expansion_cursor IS 'While expanding a tag rule: the last contact_id expanded (expansion runs in chunks, each its own transaction). NULL otherwise.';
COMMENT ON COLUMN edm.tasks.last_served_seq IS 'edm.serve_seq at this task''s latest claim; rotation among a user''s tasks serves the lowest first.';
COMMENT ON COLUMN edm.tasks.claimable IS 'Generated: status = sending and pending_count > 0. A trigger keeps edm.users.claimable_tasks in step.';
COMMENT ON COLUMN edm.tasks.first_claimed_at IS 'When the first subtask was claimed (first-send wait = this - scheduled_at).';
COMMENT ON COLUMN edm.tasks.last_activity_at IS 'Latest claim or completion; the stuck-task sweep reads it.';
COMMENT ON COLUMN edm.tasks.started_at IS 'When the task entered sending.';
COMMENT ON COLUMN edm.tasks.finished_at IS 'When the task reached completed, cancelled or failed.';
COMMENT ON COLUMN edm.tasks.stuck_since IS 'Set by the sweep when the task made no progress beyond monitoring.stuck_task_threshold.';
COMMENT ON COLUMN edm.tasks.error IS 'Why the task failed, when it did.';
COMMENT ON COLUMN edm.tasks.created_at IS 'When the task was created.';
COMMENT ON COLUMN edm.tasks.updated_at IS 'When the task''s status or settings last changed.';
COMMENT ON COLUMN edm.tasks.pause_reason IS 'Why edm-sched paused the task (the reputation breaker), NULL for a pause by the host. Resuming the user resumes exactly these.';
COMMENT ON COLUMN edm.tasks.transactional IS 'Transactional lane: claimed ahead of bulk work on the services its user may use, within queue.transactional_share of a service''s slots while bulk work waits. Set at creation or by edm.set_task_transactional.';
COMMENT ON COLUMN edm.tasks.has_limits IS 'True when edm.shaping_limits has task-scope rows for this task (kept by a trigger); the claim reads them only then.';
CREATE INDEX tasks_due_idx ON edm.tasks USING btree (scheduled_at) WHERE (status = 'scheduled'::text);
COMMENT ON INDEX edm.tasks_due_idx IS 'Scheduled tasks by start time (promotion to sending, wake-up time).';
CREATE INDEX tasks_limited_idx ON edm.tasks USING btree (task_id) WHERE (has_limits AND claimable);
COMMENT ON INDEX edm.tasks_limited_idx IS 'Claimable tasks with task limits: one probe tells the claim whether the layer is in use.';
CREATE INDEX tasks_rotation_idx ON edm.tasks USING btree (user_id, priority DESC, last_served_seq, task_id) WHERE claimable;
COMMENT ON INDEX edm.tasks_rotation_idx IS 'Rotation among one user''s claimable tasks: priority, then least recently served.';
CREATE INDEX tasks_transactional_idx ON edm.tasks USING btree (last_served_seq, task_id) WHERE (transactional AND claimable);
COMMENT ON INDEX edm.tasks_transactional_idx IS 'Claimable transactional tasks, least recently served first: the transactional lane of the claim (empty when the lane is unused).';
CREATE INDEX tasks_user_idx ON edm.tasks USING btree (user_id, task_id);
COMMENT ON INDEX edm.tasks_user_idx IS 'A user''s tasks (host API listing).';

CREATE TABLE edm.templates (
  task_id bigint NOT NULL,
  template_idx smallint NOT NULL,
  subject text NOT NULL,
  body_text text,
  body_html text,
  from_name text,
  reply_to text,
  headers jsonb DEFAULT '{}'::jsonb NOT NULL,
  list_unsubscribe boolean DEFAULT true NOT NULL,
  required_variables text[],
  CONSTRAINT templates_pkey PRIMARY KEY (task_id, template_idx),
  CONSTRAINT templates_task_id_fkey FOREIGN KEY (task_id) REFERENCES edm.tasks(task_id) ON DELETE CASCADE,
  CONSTRAINT templates_check CHECK (((body_text IS NOT NULL) OR (body_html IS NOT NULL))),
  CONSTRAINT templates_from_name_check CHECK ((from_name !~ '[\r\n]'::text)),
  CONSTRAINT templates_headers_ok CHECK ((edm.headers_problem(headers) IS NULL)),
  CONSTRAINT templates_reply_to_check CHECK (((reply_to IS NULL) OR edm.is_valid_email(reply_to))),
  CONSTRAINT templates_subject_check CHECK ((length(subject) <= 998)),
  CONSTRAINT templates_template_idx_check CHECK ((template_idx >= 0))
);
COMMENT ON TABLE edm.templates IS 'Content of a task; several templates are assigned to recipients in rotation.';
COMMENT ON COLUMN edm.templates.task_id IS 'Task the template belongs to.';
COMMENT ON COLUMN edm.templates.template_idx IS 'Position of the template in the task (0-based).';
COMMENT ON COLUMN edm.templates.subject IS 'Subject template.';
COMMENT ON COLUMN edm.templates.body_text IS 'Plain-text body template.';
COMMENT ON COLUMN edm.templates.body_html IS 'HTML body template.';
COMMENT ON COLUMN edm.templates.from_name IS 'Display name of the sender (no CR/LF).';
COMMENT ON COLUMN edm.templates.reply_to IS 'Reply-To address, if any.';
COMMENT ON COLUMN edm.templates.headers IS 'Custom header fields of the messages of this template (the task''s and the template''s own), checked by edm.headers_problem.';
COMMENT ON COLUMN edm.templates.list_unsubscribe IS 'True for bulk mail: messages carry one-click List-Unsubscribe headers when the dispatcher is configured with an unsubscribe key and URL. False for transactional mail.';
COMMENT ON COLUMN edm.templates.required_variables IS 'Variables every recipient had to have when the task was created with strict variables; NULL when not strict.';

-- ==========================================================================
-- Sites
-- Receiving mailbox providers: the domains that share their throttles, and suspensions of a (service, site).
-- ==========================================================================

CREATE FUNCTION edm.email_domain(p_email text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN lower("substring"(p_email, '@([^@]*)$'::text));
COMMENT ON FUNCTION edm.email_domain(text) IS 'The domain of an address (after its last @), lower case; NULL without an @.';
REVOKE ALL ON FUNCTION edm.email_domain(text) FROM PUBLIC;

-- ==========================================================================
-- Tasks and subtasks
-- Campaigns, their templates and one subtask per recipient; creation and lifecycle.
-- ==========================================================================

CREATE TABLE edm.subtasks (
  subtask_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  task_id bigint NOT NULL,
  email text NOT NULL,
  contact_id bigint,
  template_idx smallint DEFAULT 0 NOT NULL,
  vars jsonb,
  status text DEFAULT 'pending'::text NOT NULL,
  attempts smallint DEFAULT 0 NOT NULL,
  not_before timestamp with time zone DEFAULT '-infinity'::timestamp with time zone NOT NULL,
  lease_owner text,
  leased_at timestamp with time zone,
  lease_expires_at timestamp with time zone,
  service_id bigint,
  lease_expiries smallint DEFAULT 0 NOT NULL,
  outcome_code integer,
  outcome_detail text,
  provider_message_id text,
  finished_at timestamp with time zone,
  uncertain_sends smallint DEFAULT 0 NOT NULL,
  domain text GENERATED ALWAYS AS (COALESCE(edm.email_domain(email), ''::text)) STORED NOT NULL,
  CONSTRAINT subtasks_pkey PRIMARY KEY (subtask_id),
  CONSTRAINT subtasks_task_id_fkey FOREIGN KEY (task_id) REFERENCES edm.tasks(task_id) ON DELETE CASCADE,
  CONSTRAINT subtasks_attempts_check CHECK ((attempts >= 0)),
  CONSTRAINT subtasks_email_check CHECK ((length(email) <= 254)),
  CONSTRAINT subtasks_finished_matches_status CHECK (((status = ANY (ARRAY['sent'::text, 'failed'::text, 'cancelled'::text])) = (finished_at IS NOT NULL))),
  CONSTRAINT subtasks_lease_expiries_check CHECK ((lease_expiries >= 0)),
  CONSTRAINT subtasks_lease_matches_status CHECK (((status = 'leased'::text) = ((lease_owner IS NOT NULL) AND (lease_expires_at IS NOT NULL)))),
  CONSTRAINT subtasks_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'leased'::text, 'sent'::text, 'failed'::text, 'cancelled'::text]))),
  CONSTRAINT subtasks_uncertain_sends_check CHECK ((uncertain_sends >= 0))
) WITH (autovacuum_vacuum_scale_factor=0.02, autovacuum_vacuum_threshold=10000);
COMMENT ON TABLE edm.subtasks IS 'One recipient of one task: the unit claimed, sent and retried. Hot table: claims go through the partial index subtasks_claim_idx.';
COMMENT ON COLUMN edm.subtasks.subtask_id IS 'Surrogate id; also the "lowest pending" order within a task.';
COMMENT ON COLUMN edm.subtasks.task_id IS 'Task of the recipient.';
COMMENT ON COLUMN edm.subtasks.email IS 'Normalised recipient address (unique within the task).';
COMMENT ON COLUMN edm.subtasks.contact_id IS 'Contact the recipient came from (tag rules), NULL for explicit lists. No foreign key: contacts may be deleted after expansion.';
COMMENT ON COLUMN edm.subtasks.template_idx IS 'Template of the task used for this recipient.';
COMMENT ON COLUMN edm.subtasks.vars IS 'Per-recipient rendering variables (explicit lists), merged over contact attributes.';
COMMENT ON COLUMN edm.subtasks.status IS 'pending, leased, sent, failed or cancelled.';
COMMENT ON COLUMN edm.subtasks.attempts IS 'Send attempts started (claims), less those returned by service-level failures.';
COMMENT ON COLUMN edm.subtasks.not_before IS 'Not claimable before this time (retry back-off of a transient failure); -infinity for fresh recipients and for those returned unsent (released, service failure, expired lease), which keep their place in line.';
COMMENT ON COLUMN edm.subtasks.lease_owner IS 'Dispatcher holding the lease while status = leased.';
COMMENT ON COLUMN edm.subtasks.leased_at IS 'Slot of the current or latest attempt: the instant its send may start.';
COMMENT ON COLUMN edm.subtasks.lease_expires_at IS 'Lease expiry (slot + lease, extended by edm.renew_leases while the send runs); afterwards the sweep returns the subtask to pending and records an uncertain outcome.';
COMMENT ON COLUMN edm.subtasks.service_id IS 'Service of the current or latest attempt.';
COMMENT ON COLUMN edm.subtasks.lease_expiries IS 'Leases of this subtask that expired (uncertain outcomes: a resend may be a duplicate, I1).';
COMMENT ON COLUMN edm.subtasks.outcome_code IS 'Last reply code from the provider (SMTP code or HTTP status).';
COMMENT ON COLUMN edm.subtasks.outcome_detail IS 'Last outcome text (error message, reason of failure).';
COMMENT ON COLUMN edm.subtasks.provider_message_id IS 'Id the provider gave the accepted message.';
COMMENT ON COLUMN edm.subtasks.finished_at IS 'When the subtask reached sent, failed or cancelled.';
COMMENT ON COLUMN edm.subtasks.uncertain_sends IS 'Attempts whose outcome nobody can know because the connection was lost or timed out after the final dot (the provider may have the message). With lease_expiries, the count of possible duplicates (I1).';
COMMENT ON COLUMN edm.subtasks.domain IS 'The domain of email (edm.email_domain; '''' without an @), kept by the database. The claim finds a recipient''s site from it (edm.site_domains, read at the claim, so a mapping added later applies to queued recipients) and skips a blocked site''s recipients by it (subtasks_domain_idx).';
CREATE INDEX subtasks_claim_idx ON edm.subtasks USING btree (task_id, not_before, subtask_id) WHERE (status = 'pending'::text);
COMMENT ON INDEX edm.subtasks_claim_idx IS 'The claim: a task''s next pending subtask (fresh ones by id, then due retries).';
CREATE INDEX subtasks_domain_idx ON edm.subtasks USING btree (task_id, domain, not_before, subtask_id) WHERE (status = 'pending'::text);
COMMENT ON INDEX edm.subtasks_domain_idx IS 'A task''s pending recipients by domain, in claim order within each: the claim skips the recipients of a suspended or full site by jumping from domain to domain (edm.claim_next_subtask) instead of walking them.';
CREATE INDEX subtasks_lease_idx ON edm.subtasks USING btree (lease_expires_at) WHERE (status = 'leased'::text);
COMMENT ON INDEX edm.subtasks_lease_idx IS 'The lease sweep: leases by expiry.';
CREATE UNIQUE INDEX subtasks_task_email_idx ON edm.subtasks USING btree (task_id, email);
COMMENT ON INDEX edm.subtasks_task_email_idx IS 'One subtask per address per task: deduplication cannot be bypassed.';

CREATE FUNCTION edm.require_user(p_user_id text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM edm.users u WHERE u.user_id = p_user_id) THEN
    RAISE EXCEPTION 'unknown user %', p_user_id USING ERRCODE = 'ED001';
  END IF;
END;
$function$;
COMMENT ON FUNCTION edm.require_user(text) IS 'Raises ED001 (not found) unless user p_user_id exists.';
REVOKE ALL ON FUNCTION edm.require_user(text) FROM PUBLIC;

CREATE FUNCTION edm.reserve_quota(p_user_id text, p_n bigint)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.reserve_quota(text,bigint) IS 'Atomically reserves p_n recipients of user p_user_id''s quota, or raises ED002 (quota exceeded) and reserves nothing.';
REVOKE ALL ON FUNCTION edm.reserve_quota(text,bigint) FROM PUBLIC;

CREATE FUNCTION edm.new_task(p_user_id text, p_name text, p_templates jsonb, p_status text, p_priority integer, p_scheduled_at timestamp with time zone, p_rule jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_task bigint;
  v_n integer := jsonb_array_length(p_templates);
  v_bad text;
  v_required text[];
  v_missing record;
BEGIN
  PERFORM edm.require_user(p_user_id);
  IF v_n IS NULL OR v_n NOT BETWEEN 1 AND 100 THEN
    RAISE EXCEPTION 'a task needs 1 to 100 templates' USING ERRCODE = 'ED005';
  END IF;
  SELECT t.tpl ->> 'reply_to' INTO v_bad FROM jsonb_array_elements(p_templates) t(tpl)
  WHERE edm.email_problem(t.tpl ->> 'reply_to') IS NOT NULL AND t.tpl ->> 'reply_to' IS NOT NULL
  LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'invalid reply-to address %: %', quote_literal(v_bad), edm.email_problem(v_bad)
      USING ERRCODE = 'ED005';
  END IF;

  -- Strict variables: every recipient must have every variable the templates
  -- need (the templates carry the list, computed from their syntax tree).
  v_required := ARRAY(
    SELECT DISTINCT x FROM jsonb_array_elements(p_templates) t(tpl),
           jsonb_array_elements_text(CASE WHEN jsonb_typeof(t.tpl -> 'required_variables') = 'array'
                                          THEN t.tpl -> 'required_variables' ELSE '[]' END) x
    ORDER BY x);
  IF cardinality(v_required) > 0 THEN
    IF p_rule ? 'list' THEN
      SELECT count(*) OVER () AS n, s.email,
             ARRAY(SELECT r FROM unnest(v_required) r
                   WHERE NOT coalesce(s.vars, '{}'::jsonb) ? r) AS missing
      INTO v_missing
      FROM pg_temp.edm_stage_recipients s
      WHERE edm.email_problem(s.email) IS NULL
        AND NOT coalesce(jsonb_typeof(s.vars) = 'object' AND s.vars ?& v_required, false)
      ORDER BY s.ord LIMIT 1;
    ELSE
      SELECT count(*) OVER () AS n, c.email,
             ARRAY(SELECT r FROM unnest(v_required) r WHERE NOT c.attributes ? r) AS missing
      INTO v_missing
      FROM edm.contacts c
      WHERE c.user_id = p_user_id AND NOT c.unsubscribed AND edm.rule_matches(p_rule, c.tags)
        AND NOT c.attributes ?& v_required
      ORDER BY c.contact_id LIMIT 1;
    END IF;
    IF v_missing.email IS NOT NULL THEN
      RAISE EXCEPTION '% recipient(s) lack variables the templates use; first %: missing %',
        v_missing.n, quote_literal(v_missing.email), array_to_string(v_missing.missing, ', ')
        USING ERRCODE = 'ED030',
              DETAIL = format('required=%s', array_to_string(v_required, ','));
    END IF;
  END IF;

  INSERT INTO edm.tasks (user_id, name, status, priority, scheduled_at, recipient_rule, template_count)
  VALUES (p_user_id, p_name, p_status, coalesce(p_priority, 0), coalesce(p_scheduled_at, now()),
          p_rule, v_n)
  RETURNING task_id INTO v_task;
  INSERT INTO edm.templates (task_id, template_idx, subject, body_text, body_html, from_name, reply_to,
                             headers, list_unsubscribe, required_variables)
  SELECT v_task, (t.ord - 1)::smallint, t.tpl ->> 'subject', t.tpl ->> 'body_text',
         t.tpl ->> 'body_html', t.tpl ->> 'from_name', t.tpl ->> 'reply_to',
         coalesce(t.tpl -> 'headers', '{}'::jsonb),
         coalesce((t.tpl ->> 'list_unsubscribe')::boolean, true),
         CASE WHEN jsonb_typeof(t.tpl -> 'required_variables') = 'array'
              THEN ARRAY(SELECT jsonb_array_elements_text(t.tpl -> 'required_variables')) END
  FROM jsonb_array_elements(p_templates) WITH ORDINALITY AS t(tpl, ord);
  RETURN v_task;
END;
$function$;
COMMENT ON FUNCTION edm.new_task(text,text,jsonb,text,integer,timestamp with time zone,jsonb) IS 'Inserts a task row and its templates (a JSON array of {subject, body_text, body_html, from_name, reply_to, headers, list_unsubscribe, required_variables}). Refuses an invalid reply-to (ED005) and, when templates carry required_variables (strict variables), recipients lacking any of them (ED030): the staged list''s vars, or the attributes of the contacts a tag rule matches. Internal to the create_task_* functions.';
REVOKE ALL ON FUNCTION edm.new_task(text,text,jsonb,text,integer,timestamp with time zone,jsonb) FROM PUBLIC;

CREATE FUNCTION edm.create_task_from_staged(p_user_id text, p_name text, p_templates jsonb, p_priority integer DEFAULT 0, p_scheduled_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_skip_invalid boolean DEFAULT false)
 RETURNS TABLE(task_id bigint, recipients integer, invalid integer, duplicates integer, suppressed integer)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
    -- nothing to send: started, and completed at once by trigger tasks_when_drained
    UPDATE edm.tasks t SET status = 'sending' WHERE t.task_id = v_task;
  END IF;
  RETURN QUERY SELECT v_task, v_n, v_invalid, v_dups, v_supp;
END;
$function$;
COMMENT ON FUNCTION edm.create_task_from_staged(text,text,jsonb,integer,timestamp with time zone,boolean) IS 'Creates a task from the explicit list COPYed into the session''s temporary table edm_stage_recipients, in one transaction: invalid addresses refuse the task (or are skipped with p_skip_invalid), duplicates are merged, suppressed and unsubscribed addresses dropped, the user''s quota reserved (ED002 and nothing written when short). Returns the counts.';
REVOKE ALL ON FUNCTION edm.create_task_from_staged(text,text,jsonb,integer,timestamp with time zone,boolean) FROM PUBLIC;

CREATE FUNCTION edm.create_task_from_rule(p_user_id text, p_name text, p_templates jsonb, p_rule jsonb, p_priority integer DEFAULT 0, p_scheduled_at timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(task_id bigint, recipients integer)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.create_task_from_rule(text,text,jsonb,jsonb,integer,timestamp with time zone) IS 'Creates a task from a tag rule in status expanding and reserves the user''s quota for every matching contact (ED002 and nothing written when short). Subtasks are then created by edm.expand_task() in chunks, each its own transaction.';
REVOKE ALL ON FUNCTION edm.create_task_from_rule(text,text,jsonb,jsonb,integer,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.expand_task(p_task_id bigint, p_chunk integer DEFAULT 1000000)
 RETURNS TABLE(added integer, done boolean)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
    -- nothing to send: started, and completed at once by trigger tasks_when_drained
    UPDATE edm.tasks tk SET status = 'sending' WHERE tk.task_id = p_task_id;
  END IF;
  RETURN QUERY SELECT v_added, true;
END;
$function$;
COMMENT ON FUNCTION edm.expand_task(bigint,integer) IS 'Creates the next chunk (at most p_chunk) of subtasks of an expanding tag-rule task, in contact order; progress is visible in total_count. Never creates more subtasks than the task reserved at creation (contacts matching only since then are left out). The last chunk refunds unused quota and moves the task to scheduled. Safe to call again after a crash: it resumes from expansion_cursor.';
REVOKE ALL ON FUNCTION edm.expand_task(bigint,integer) FROM PUBLIC;

CREATE FUNCTION edm.lock_task(p_task_id bigint, p_user_id text)
 RETURNS edm.tasks
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.lock_task(bigint,text) IS 'Locks and returns task p_task_id, scoped to p_user_id when given (another user''s task is "unknown", ED001).';
REVOKE ALL ON FUNCTION edm.lock_task(bigint,text) FROM PUBLIC;

CREATE FUNCTION edm.pause_task(p_task_id bigint, p_user_id text DEFAULT NULL::text)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.pause_task(bigint,text) IS 'Pauses a scheduled or sending task: no claim commits for it after this commits (a claim holding the task''s row lock finishes first). Leased subtasks complete normally. Idempotent.';
REVOKE ALL ON FUNCTION edm.pause_task(bigint,text) FROM PUBLIC;

CREATE FUNCTION edm.resume_task(p_task_id bigint, p_user_id text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
  -- a drained task resumed to sending comes back completed (trigger tasks_when_drained)
  UPDATE edm.tasks tk SET status = v_status WHERE tk.task_id = p_task_id
  RETURNING tk.status INTO v_status;
  RETURN v_status;
END;
$function$;
COMMENT ON FUNCTION edm.resume_task(bigint,text,timestamp with time zone) IS 'Resumes a paused task where it stopped (its pending subtasks keep their order; nothing is re-sent). Returns the new status.';
REVOKE ALL ON FUNCTION edm.resume_task(bigint,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.cancel_task(p_task_id bigint, p_user_id text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
$function$;
COMMENT ON FUNCTION edm.cancel_task(bigint,text,timestamp with time zone) IS 'Cancels a task: its pending subtasks become cancelled and their reserved quota is refunded to the user; leased subtasks finish (a retry after cancel becomes cancelled). Returns how many subtasks were cancelled.';
REVOKE ALL ON FUNCTION edm.cancel_task(bigint,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.is_bulk_task(p_task_id bigint)
 RETURNS boolean
 LANGUAGE sql
 STABLE
RETURN (EXISTS (SELECT 1 FROM edm.templates tp WHERE ((tp.task_id = is_bulk_task.p_task_id) AND tp.list_unsubscribe)));
COMMENT ON FUNCTION edm.is_bulk_task(bigint) IS 'True for bulk (marketing) tasks: a template with list_unsubscribe. Transactional tasks (list_unsubscribe = false) are never paused by the reputation breaker.';
REVOKE ALL ON FUNCTION edm.is_bulk_task(bigint) FROM PUBLIC;

CREATE FUNCTION edm.tasks_track_status()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  IF TG_OP = 'INSERT' THEN
    NEW.prev_status := NULL;
  ELSE
    NEW.prev_status := OLD.status;
  END IF;
  NEW.updated_at := now();
  IF NEW.status = 'sending' AND NEW.started_at IS NULL THEN
    NEW.started_at := now();
  END IF;
  IF NEW.status IN ('completed', 'cancelled', 'failed') THEN
    NEW.finished_at := coalesce(NEW.finished_at, now());
  END IF;
  RETURN NEW;
END;
$function$;
COMMENT ON FUNCTION edm.tasks_track_status() IS 'Trigger: records prev_status on every status change (so tasks_transition_ok can check the transition) and stamps started_at / finished_at.';
REVOKE ALL ON FUNCTION edm.tasks_track_status() FROM PUBLIC;

CREATE FUNCTION edm.tasks_sync_claimable()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.claimable THEN
    UPDATE edm.users SET claimable_tasks = claimable_tasks - 1 WHERE user_id = OLD.user_id;
  END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.claimable THEN
    UPDATE edm.users SET claimable_tasks = claimable_tasks + 1 WHERE user_id = NEW.user_id;
  END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.claimable THEN
    PERFORM pg_notify('edm_wakeup', NEW.task_id::text);
  END IF;
  RETURN NULL;
END;
$function$;
COMMENT ON FUNCTION edm.tasks_sync_claimable() IS 'Trigger: keeps edm.users.claimable_tasks equal to the user''s tasks with claimable = true, and wakes dispatchers (NOTIFY edm_wakeup) when a task becomes claimable.';
REVOKE ALL ON FUNCTION edm.tasks_sync_claimable() FROM PUBLIC;

CREATE FUNCTION edm.tasks_notify_scheduled()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  PERFORM pg_notify('edm_wakeup', 'task:' || NEW.task_id);
  RETURN NULL;
END;
$function$;
COMMENT ON FUNCTION edm.tasks_notify_scheduled() IS 'Trigger: NOTIFY edm_wakeup when a task becomes scheduled, so idle dispatchers re-compute their wake-up time (and start it at once when it is due).';
REVOKE ALL ON FUNCTION edm.tasks_notify_scheduled() FROM PUBLIC;

CREATE FUNCTION edm.start_due_tasks(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  -- SKIP LOCKED: a task being paused or cancelled right now is left alone,
  -- and two dispatchers never wait on each other here.
  UPDATE edm.tasks t SET status = 'sending'
  WHERE t.task_id IN (
    SELECT d.task_id FROM edm.tasks d
    WHERE d.status = 'scheduled' AND d.scheduled_at <= coalesce(p_now, now())
    ORDER BY d.scheduled_at
    LIMIT 1000
    FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.start_due_tasks(timestamp with time zone) IS 'Moves scheduled tasks whose scheduled_at has come to sending. Called at the start of every claim; returns how many started.';
REVOKE ALL ON FUNCTION edm.start_due_tasks(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.task_drained(p_status text, p_pending integer, p_leased integer)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ((p_status = 'sending'::text) AND (p_pending = 0) AND (p_leased = 0));
COMMENT ON FUNCTION edm.task_drained(text,integer,integer) IS 'The rule of task completion, in one place: a task that is sending with nothing pending and nothing leased is drained, and trigger tasks_when_drained makes it completed.';
REVOKE ALL ON FUNCTION edm.task_drained(text,integer,integer) FROM PUBLIC;

CREATE FUNCTION edm.tasks_complete_drained()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  NEW.status := 'completed';
  NEW.prev_status := 'sending';  -- it passed through sending, if only within this statement
  NEW.started_at := coalesce(NEW.started_at, now());
  NEW.finished_at := coalesce(NEW.finished_at, now());
  NEW.updated_at := now();
  RETURN NEW;
END;
$function$;
COMMENT ON FUNCTION edm.tasks_complete_drained() IS 'Trigger: completes a drained task (edm.task_drained) in the row being written: status completed after sending, started_at and finished_at stamped (a finished_at given by the statement is kept).';
REVOKE ALL ON FUNCTION edm.tasks_complete_drained() FROM PUBLIC;

CREATE TRIGGER tasks_track_status_ins BEFORE INSERT ON edm.tasks FOR EACH ROW EXECUTE FUNCTION edm.tasks_track_status();

CREATE TRIGGER tasks_track_status_upd BEFORE UPDATE OF status ON edm.tasks FOR EACH ROW WHEN ((old.status IS DISTINCT FROM new.status)) EXECUTE FUNCTION edm.tasks_track_status();

CREATE TRIGGER tasks_sync_claimable_ins AFTER INSERT ON edm.tasks FOR EACH ROW WHEN (new.claimable) EXECUTE FUNCTION edm.tasks_sync_claimable();

CREATE TRIGGER tasks_sync_claimable_upd AFTER UPDATE OF status, pending_count ON edm.tasks FOR EACH ROW WHEN ((old.claimable IS DISTINCT FROM new.claimable)) EXECUTE FUNCTION edm.tasks_sync_claimable();

CREATE TRIGGER tasks_sync_claimable_del AFTER DELETE ON edm.tasks FOR EACH ROW WHEN (old.claimable) EXECUTE FUNCTION edm.tasks_sync_claimable();

CREATE TRIGGER tasks_notify_scheduled AFTER INSERT OR UPDATE OF status ON edm.tasks FOR EACH ROW WHEN ((new.status = 'scheduled'::text)) EXECUTE FUNCTION edm.tasks_notify_scheduled();

CREATE TRIGGER tasks_audit AFTER INSERT ON edm.tasks FOR EACH ROW EXECUTE FUNCTION edm.audit_row('task');

CREATE TRIGGER tasks_audit_upd AFTER UPDATE OF status ON edm.tasks FOR EACH ROW WHEN (((old.status IS DISTINCT FROM new.status) AND ((new.status = ANY (ARRAY['paused'::text, 'cancelled'::text])) OR (old.status = 'paused'::text)))) EXECUTE FUNCTION edm.audit_row('task');

CREATE TRIGGER tasks_when_drained BEFORE UPDATE ON edm.tasks FOR EACH ROW WHEN (edm.task_drained(new.status, new.pending_count, new.leased_count)) EXECUTE FUNCTION edm.tasks_complete_drained();
COMMENT ON TRIGGER tasks_when_drained ON edm.tasks IS 'One place for "a drained task is completed": every update that leaves a task sending with nothing pending or leased completes it.';

-- ==========================================================================
-- Readiness and quotas
-- When a service may send: the predicates the claim uses.
-- ==========================================================================

CREATE FUNCTION edm.service_sent_today(s edm.services, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE sql
 STABLE
RETURN CASE WHEN ((s).quota_day = ((COALESCE(p_now, now()) AT TIME ZONE (s).quota_tz))::date) THEN (s).sent_today ELSE 0 END;
COMMENT ON FUNCTION edm.service_sent_today(edm.services,timestamp with time zone) IS 'Sends the service started in its current quota day (0 once its local midnight has passed).';
REVOKE ALL ON FUNCTION edm.service_sent_today(edm.services,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.service_next_quota_day(p_tz text, p_now timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE
RETURN (((((p_now AT TIME ZONE p_tz))::date + 1))::timestamp without time zone AT TIME ZONE p_tz);
COMMENT ON FUNCTION edm.service_next_quota_day(text,timestamp with time zone) IS 'The next local midnight in time zone p_tz after p_now: when a new quota day starts (DST-safe).';
REVOKE ALL ON FUNCTION edm.service_next_quota_day(text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.service_is_ready(s edm.services, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS boolean
 LANGUAGE sql
 STABLE
RETURN ((s).enabled AND ((s).next_available_at <= COALESCE(p_now, now())) AND (edm.service_sent_today(s, p_now) < (s).daily_quota));
COMMENT ON FUNCTION edm.service_is_ready(edm.services,timestamp with time zone) IS 'A ready service: enabled, healthy (not backing off), under its daily quota for its current quota day, and its interval elapsed. The same predicate as the claim''s service scan.';
REVOKE ALL ON FUNCTION edm.service_is_ready(edm.services,timestamp with time zone) FROM PUBLIC;

-- ==========================================================================
-- Rate limits
-- A service's limits (rate with burst, rolling window, calendar day) and how a claim takes them; see docs/explanation/rate-limits.md.
-- ==========================================================================

CREATE TABLE edm.service_limits (
  service_id bigint NOT NULL,
  name text NOT NULL,
  kind text NOT NULL,
  max_count integer NOT NULL,
  window_ms bigint,
  burst integer DEFAULT 1 NOT NULL,
  time_zone text,
  tat timestamp with time zone,
  bucket_idx bigint[] DEFAULT '{}'::bigint[] NOT NULL,
  bucket_n integer[] DEFAULT '{}'::integer[] NOT NULL,
  day date,
  day_count integer DEFAULT 0 NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT service_limits_pkey PRIMARY KEY (service_id, name),
  CONSTRAINT service_limits_service_id_fkey FOREIGN KEY (service_id) REFERENCES edm.services(service_id) ON DELETE CASCADE,
  CONSTRAINT service_limits_buckets CHECK ((cardinality(bucket_idx) = cardinality(bucket_n))),
  CONSTRAINT service_limits_burst_check CHECK (((burst >= 1) AND (burst <= 100000))),
  CONSTRAINT service_limits_day_count_check CHECK ((day_count >= 0)),
  CONSTRAINT service_limits_kind_check CHECK ((kind = ANY (ARRAY['rate'::text, 'rolling'::text, 'calendar_day'::text]))),
  CONSTRAINT service_limits_max_count_check CHECK (((max_count >= 0) AND (max_count <= 100000000))),
  CONSTRAINT service_limits_name_check CHECK ((name ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'::text)),
  CONSTRAINT service_limits_shape CHECK (
CASE kind
    WHEN 'calendar_day'::text THEN ((window_ms IS NULL) AND (burst = 1))
    WHEN 'rolling'::text THEN ((window_ms IS NOT NULL) AND (window_ms >= 1000) AND (burst = 1) AND (time_zone IS NULL))
    ELSE ((window_ms IS NOT NULL) AND (time_zone IS NULL) AND (burst <= GREATEST(max_count, 1)))
END),
  CONSTRAINT service_limits_time_zone_check CHECK (((time_zone IS NULL) OR edm.is_valid_timezone(time_zone))),
  CONSTRAINT service_limits_window_ms_check CHECK (((window_ms >= 1) AND (window_ms <= (31 * (86400000)::bigint))))
);
COMMENT ON TABLE edm.service_limits IS 'Limits of a service beyond its built-in interval_ms and daily_quota, all held at once (the smallest headroom wins). rate: at most max_count per window_ms, in bursts of at most burst (a token bucket, checked by GCRA; burst 1 spaces sends window_ms/max_count apart, so no window of window_ms holds more than max_count). rolling: at most max_count in any window of window_ms (e.g. SES Max24HourSend). calendar_day: at most max_count per calendar day in time_zone (default: the service''s quota_tz). Set with edm.set_service_limits; see docs/explanation/rate-limits.md.';
COMMENT ON COLUMN edm.service_limits.service_id IS 'Service limited.';
COMMENT ON COLUMN edm.service_limits.name IS 'Name of the limit, unique per service (e.g. per_second, per_minute, rolling_24h); waiting reasons name it.';
COMMENT ON COLUMN edm.service_limits.kind IS 'rate, rolling or calendar_day.';
COMMENT ON COLUMN edm.service_limits.max_count IS 'Most sends per window (0 blocks the service).';
COMMENT ON COLUMN edm.service_limits.window_ms IS 'Window length in milliseconds (rate and rolling); NULL for calendar_day.';
COMMENT ON COLUMN edm.service_limits.burst IS 'rate only: most sends at once (token bucket depth); 1 spaces sends evenly.';
COMMENT ON COLUMN edm.service_limits.time_zone IS 'calendar_day only: time zone whose midnight starts a day; NULL = the service''s quota_tz.';
COMMENT ON COLUMN edm.service_limits.tat IS 'rate state: GCRA theoretical arrival time (a send at t is allowed when t >= tat - (burst - 1) * window_ms / max_count).';
COMMENT ON COLUMN edm.service_limits.bucket_idx IS 'rolling state: indexes (epoch milliseconds / bucket width) of the buckets with sends, oldest first; the bucket width is window_ms / 200 rounded up.';
COMMENT ON COLUMN edm.service_limits.bucket_n IS 'rolling state: sends slotted in each bucket of bucket_idx.';
COMMENT ON COLUMN edm.service_limits.day IS 'calendar_day state: the local date day_count counts.';
COMMENT ON COLUMN edm.service_limits.day_count IS 'calendar_day state: sends slotted on day.';
COMMENT ON COLUMN edm.service_limits.created_at IS 'When the limit was set.';

CREATE FUNCTION edm.limit_bucket_ms(p_window_ms bigint)
 RETURNS bigint
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN GREATEST((1)::bigint, (ceil(((p_window_ms)::numeric / 200.0)))::bigint);
COMMENT ON FUNCTION edm.limit_bucket_ms(bigint) IS 'Bucket width of a rolling limit of p_window_ms: window / 200, rounded up (at least 1 ms).';
REVOKE ALL ON FUNCTION edm.limit_bucket_ms(bigint) FROM PUBLIC;

CREATE FUNCTION edm.limit_next(l edm.service_limits, p_at timestamp with time zone, p_service_tz text)
 RETURNS timestamp with time zone
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
  v_tz   text := coalesce(l.time_zone, p_service_tz);
  v_bms  bigint;
  v_span bigint;
  v_b    bigint;
  v_sum  bigint := 0;
  v_need bigint;
  i      integer;
BEGIN
  IF l.max_count = 0 THEN
    RETURN 'infinity';
  END IF;
  IF l.kind = 'rate' THEN
    -- GCRA: allowed at t when t >= tat - tau, tau = (burst - 1) * T.
    RETURN greatest(p_at, l.tat - ((l.burst - 1) * l.window_ms::double precision / l.max_count)
                                   * interval '1 millisecond');
  ELSIF l.kind = 'calendar_day' THEN
    IF l.day = (p_at AT TIME ZONE v_tz)::date AND l.day_count >= l.max_count THEN
      RETURN edm.service_next_quota_day(v_tz, p_at);
    END IF;
    RETURN p_at;
  END IF;
  -- rolling: the sends counted at t are those of buckets b >= b(t) - span,
  -- which cover (t - window, t] and at most one bucket more (an upper bound).
  v_bms := edm.limit_bucket_ms(l.window_ms);
  v_span := ceil(l.window_ms::numeric / v_bms)::bigint;
  v_b := edm.epoch_ms(p_at) / v_bms;
  FOR i IN 1 .. cardinality(l.bucket_idx) LOOP
    IF l.bucket_idx[i] >= v_b - v_span THEN
      v_sum := v_sum + l.bucket_n[i];
    END IF;
  END LOOP;
  IF v_sum < l.max_count THEN
    RETURN p_at;
  END IF;
  -- Full: wait until enough of the oldest buckets have left the window.
  v_need := v_sum - l.max_count + 1;
  FOR i IN 1 .. cardinality(l.bucket_idx) LOOP
    CONTINUE WHEN l.bucket_idx[i] < v_b - v_span;
    v_need := v_need - l.bucket_n[i];
    IF v_need <= 0 THEN
      -- bucket i no longer counts once b(t) - span > bucket_idx[i]
      RETURN greatest(p_at, to_timestamp((l.bucket_idx[i] + v_span + 1) * v_bms / 1000.0));
    END IF;
  END LOOP;
  RETURN 'infinity';
END;
$function$;
COMMENT ON FUNCTION edm.limit_next(edm.service_limits,timestamp with time zone,text) IS 'The earliest instant at or after p_at at which limit l admits one more send (infinity when max_count is 0). p_service_tz is the service''s quota_tz, the default day boundary of a calendar_day limit.';
REVOKE ALL ON FUNCTION edm.limit_next(edm.service_limits,timestamp with time zone,text) FROM PUBLIC;

CREATE FUNCTION edm.limits_next(p_service_id bigint, p_at timestamp with time zone, p_service_tz text)
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE
RETURN COALESCE((SELECT max(edm.limit_next(l.*, limits_next.p_at, limits_next.p_service_tz)) AS max FROM edm.service_limits l WHERE (l.service_id = limits_next.p_service_id)), p_at);
COMMENT ON FUNCTION edm.limits_next(bigint,timestamp with time zone,text) IS 'The earliest instant at or after p_at at which every limit of the service in edm.service_limits admits one more send.';
REVOKE ALL ON FUNCTION edm.limits_next(bigint,timestamp with time zone,text) FROM PUBLIC;

CREATE FUNCTION edm.limit_after(l edm.service_limits, p_slot timestamp with time zone, p_tz text, p_margin interval DEFAULT '00:00:00'::interval)
 RETURNS edm.service_limits
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
  r edm.service_limits := l;
  v_tz text := coalesce(l.time_zone, p_tz);
  v_bms bigint;
  v_b bigint;
  v_min bigint;
  v_prev bigint;
  v_done boolean := false;
  i integer;
BEGIN
  IF l.kind = 'rate' THEN
    -- A bucket that was idle starts from the send's arrival: its slot, or up to
    -- p_margin later (the lateness of a send no lane paces against this limit).
    -- The margin is capped at the limit's burst tolerance: it then costs
    -- nothing while the limit binds, and a limit without a burst gets none.
    r.tat := greatest(coalesce(l.tat, p_slot), p_slot
                      + least(p_margin, ((l.burst - 1) * l.window_ms::double precision
                                         / greatest(l.max_count, 1)) * interval '1 millisecond'))
             + (l.window_ms::double precision / greatest(l.max_count, 1)) * interval '1 millisecond';
  ELSIF l.kind = 'calendar_day' THEN
    r.day_count := CASE WHEN l.day = (p_slot AT TIME ZONE v_tz)::date THEN l.day_count + 1 ELSE 1 END;
    r.day := (p_slot AT TIME ZONE v_tz)::date;
  ELSE
    -- rolling: the rule of edm.rolling_buckets_add (the slot's bucket gains
    -- one, buckets older than any window that can still count go), on the
    -- arrays here. That function is a query, planned again on every call:
    -- 0.35 ms a send, a third of a shaped claim (0022).
    v_bms := edm.limit_bucket_ms(l.window_ms);
    v_b := edm.epoch_ms(p_slot) / v_bms;
    v_min := v_b - ceil(l.window_ms::numeric / v_bms)::bigint - 1;
    r.bucket_idx := '{}';
    r.bucket_n := '{}';
    FOR i IN 1 .. coalesce(cardinality(l.bucket_idx), 0) LOOP
      IF l.bucket_idx[i] <= v_prev THEN
        -- not in ascending order (never written so): the general rule
        SELECT b.bucket_idx, b.bucket_n INTO r.bucket_idx, r.bucket_n
        FROM edm.rolling_buckets_add(l.bucket_idx, l.bucket_n, l.window_ms, p_slot) b;
        RETURN r;
      END IF;
      v_prev := l.bucket_idx[i];
      CONTINUE WHEN l.bucket_idx[i] < v_min;
      IF NOT v_done AND l.bucket_idx[i] >= v_b THEN
        v_done := true;
        IF l.bucket_idx[i] = v_b THEN
          r.bucket_idx := r.bucket_idx || v_b;
          r.bucket_n := r.bucket_n || (l.bucket_n[i] + 1);
          CONTINUE;
        END IF;
        r.bucket_idx := r.bucket_idx || v_b;
        r.bucket_n := r.bucket_n || 1;
      END IF;
      r.bucket_idx := r.bucket_idx || l.bucket_idx[i];
      r.bucket_n := r.bucket_n || l.bucket_n[i];
    END LOOP;
    IF NOT v_done THEN
      r.bucket_idx := r.bucket_idx || v_b;
      r.bucket_n := r.bucket_n || 1;
    END IF;
  END IF;
  RETURN r;
END;
$function$;
COMMENT ON FUNCTION edm.limit_after(edm.service_limits,timestamp with time zone,text,interval) IS 'Limit l after one more send slotted at p_slot (the transition edm.limits_take applies to a service''s limits): rate advances its GCRA arrival time (a bucket that was idle starts from p_slot + p_margin, the send''s latest expected arrival, the margin capped at the burst tolerance (burst - 1) * window / max_count: see queue.shaping_arrival_margin_ms), calendar_day counts the local day (in l.time_zone, else p_tz), rolling adds to the slot''s bucket (the rule of edm.rolling_buckets_add, computed without a query).';
REVOKE ALL ON FUNCTION edm.limit_after(edm.service_limits,timestamp with time zone,text,interval) FROM PUBLIC;

CREATE FUNCTION edm.rolling_buckets_add(p_idx bigint[], p_n integer[], p_window_ms bigint, p_slot timestamp with time zone, OUT bucket_idx bigint[], OUT bucket_n integer[])
 RETURNS record
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
 SELECT array_agg(x.b ORDER BY x.b) AS bucket_idx,
     array_agg(x.n ORDER BY x.b) AS bucket_n
    FROM ( SELECT u.b,
             (sum(u.n))::integer AS n
            FROM ( SELECT t.b,
                     t.n
                    FROM UNNEST(rolling_buckets_add.p_idx, rolling_buckets_add.p_n) t(b, n)
                 UNION ALL
                  SELECT (edm.epoch_ms(rolling_buckets_add.p_slot) / edm.limit_bucket_ms(rolling_buckets_add.p_window_ms)) AS b,
                     1 AS n) u
           WHERE ((u.b)::numeric >= ((((edm.epoch_ms(rolling_buckets_add.p_slot) / edm.limit_bucket_ms(rolling_buckets_add.p_window_ms)))::numeric - ceil(((rolling_buckets_add.p_window_ms)::numeric / (edm.limit_bucket_ms(rolling_buckets_add.p_window_ms))::numeric))) - (1)::numeric))
           GROUP BY u.b) x;
END;
COMMENT ON FUNCTION edm.rolling_buckets_add(bigint[],integer[],bigint,timestamp with time zone) IS 'The bucket arrays of a rolling limit (edm.service_limits.bucket_idx, bucket_n) after one more send slotted at p_slot: its bucket gains one, buckets older than any window that can still count are dropped.';
REVOKE ALL ON FUNCTION edm.rolling_buckets_add(bigint[],integer[],bigint,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.limits_take(p_service_id bigint, p_slot timestamp with time zone, p_service_tz text)
 RETURNS void
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
BEGIN ATOMIC
 UPDATE edm.service_limits l SET tat =
         CASE
             WHEN (l.kind = 'rate'::text) THEN (GREATEST(COALESCE(l.tat, limits_take.p_slot), limits_take.p_slot) + (((l.window_ms)::double precision / (GREATEST(l.max_count, 1))::double precision) * '00:00:00.001'::interval))
             ELSE l.tat
         END, day_count =
         CASE
             WHEN (l.kind <> 'calendar_day'::text) THEN 0
             WHEN (l.day = ((limits_take.p_slot AT TIME ZONE COALESCE(l.time_zone, limits_take.p_service_tz)))::date) THEN (l.day_count + 1)
             ELSE 1
         END, day =
         CASE
             WHEN (l.kind = 'calendar_day'::text) THEN ((limits_take.p_slot AT TIME ZONE COALESCE(l.time_zone, limits_take.p_service_tz)))::date
             ELSE NULL::date
         END, (bucket_idx, bucket_n) = ( SELECT COALESCE(r.bucket_idx, l.bucket_idx) AS bucket_idx,
             COALESCE(r.bucket_n, l.bucket_n) AS bucket_n
            FROM edm.rolling_buckets_add(l.bucket_idx, l.bucket_n, l.window_ms, limits_take.p_slot) r(bucket_idx, bucket_n)
           WHERE (l.kind = 'rolling'::text)
         UNION ALL
          SELECT l.bucket_idx,
             l.bucket_n
           WHERE (l.kind <> 'rolling'::text))
   WHERE (l.service_id = limits_take.p_service_id);
END;
COMMENT ON FUNCTION edm.limits_take(bigint,timestamp with time zone,text) IS 'Counts one send slotted at p_slot against every limit of the service (the caller, the claim, checked edm.limits_next first and holds the service row lock).';
REVOKE ALL ON FUNCTION edm.limits_take(bigint,timestamp with time zone,text) FROM PUBLIC;

CREATE FUNCTION edm.service_binding_limit(s edm.services, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(limit_name text, free_at timestamp with time zone)
 LANGUAGE sql
 STABLE
BEGIN ATOMIC
 SELECT x.limit_name,
     x.free_at
    FROM ( SELECT 'interval'::text AS limit_name,
             edm.ts_add_ms((service_binding_limit.s).last_sent_at, (service_binding_limit.s).interval_ms) AS free_at
         UNION ALL
          SELECT 'daily_quota'::text AS limit_name,
             edm.service_next_quota_day((service_binding_limit.s).quota_tz, COALESCE(service_binding_limit.p_now, now())) AS free_at
           WHERE (edm.service_sent_today(service_binding_limit.s, COALESCE(service_binding_limit.p_now, now())) >= (service_binding_limit.s).daily_quota)
         UNION ALL
          SELECT l.name AS limit_name,
             edm.limit_next(l.*, COALESCE(service_binding_limit.p_now, now()), (service_binding_limit.s).quota_tz) AS free_at
            FROM edm.service_limits l
           WHERE (l.service_id = (service_binding_limit.s).service_id)) x
   WHERE (x.free_at > COALESCE(service_binding_limit.p_now, now()))
   ORDER BY x.free_at DESC, x.limit_name
  LIMIT 1;
END;
COMMENT ON FUNCTION edm.service_binding_limit(edm.services,timestamp with time zone) IS 'The limit that holds service s back at p_now (interval, daily_quota or the name of an extra limit) and when it frees; no row when no limit does. With several, the one that frees last binds.';
REVOKE ALL ON FUNCTION edm.service_binding_limit(edm.services,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.service_limits_flag()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  UPDATE edm.services s
  SET has_limits = EXISTS (SELECT 1 FROM edm.service_limits l WHERE l.service_id = s.service_id),
      -- re-decide from scratch: the next claim recomputes any block
      quota_exhausted_until = NULL
  WHERE s.service_id IN (SELECT x.service_id FROM changed x);
  RETURN NULL;
END;
$function$;
COMMENT ON FUNCTION edm.service_limits_flag() IS 'Statement trigger on edm.service_limits: keeps services.has_limits in step and clears a block computed from the old limits (the next claim recomputes it).';
REVOKE ALL ON FUNCTION edm.service_limits_flag() FROM PUBLIC;

CREATE FUNCTION edm.set_service_limits(p_service_id bigint, p_limits jsonb)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  IF p_limits IS NULL OR jsonb_typeof(p_limits) <> 'array' OR jsonb_array_length(p_limits) > 20 THEN
    RAISE EXCEPTION 'limits must be a JSON array of at most 20 limits' USING ERRCODE = 'ED005';
  END IF;
  PERFORM 1 FROM edm.services s WHERE s.service_id = p_service_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_limits) e
             WHERE jsonb_typeof(e) <> 'object'
                OR NOT (e ?& ARRAY['name', 'kind', 'max_count'])
                OR EXISTS (SELECT 1 FROM jsonb_object_keys(e) k
                           WHERE k NOT IN ('name', 'kind', 'max_count', 'window_ms', 'burst', 'time_zone'))) THEN
    RAISE EXCEPTION 'each limit is an object with name, kind, max_count and optionally window_ms, burst, time_zone'
      USING ERRCODE = 'ED005';
  END IF;
  IF (SELECT count(DISTINCT e->>'name') FROM jsonb_array_elements(p_limits) e)
     <> jsonb_array_length(p_limits) THEN
    RAISE EXCEPTION 'limit names must be unique per service' USING ERRCODE = 'ED005';
  END IF;
  BEGIN
    -- Keep the state of limits whose shape did not change (no fresh burst on
    -- an edit, no restarted count): one whose max_count alone changes is
    -- changed in place (0022). A running warm-up's limit is left alone.
    UPDATE edm.service_limits l SET max_count = (e->>'max_count')::integer
    FROM jsonb_array_elements(p_limits) e
    WHERE l.service_id = p_service_id
      AND e->>'name' = l.name AND e->>'kind' = l.kind
      AND (e->>'max_count')::integer <> l.max_count
      AND (e->>'window_ms')::bigint IS NOT DISTINCT FROM l.window_ms
      AND coalesce((e->>'burst')::integer, 1) = l.burst
      AND (e->>'time_zone') IS NOT DISTINCT FROM l.time_zone
      AND NOT (l.name = 'warmup'
               AND EXISTS (SELECT 1 FROM edm.service_warmups w WHERE w.service_id = p_service_id));
    DELETE FROM edm.service_limits l
    WHERE l.service_id = p_service_id
      AND NOT EXISTS (
        SELECT 1 FROM jsonb_array_elements(p_limits) e
        WHERE e->>'name' = l.name AND e->>'kind' = l.kind
          AND (e->>'max_count')::integer = l.max_count
          AND (e->>'window_ms')::bigint IS NOT DISTINCT FROM l.window_ms
          AND coalesce((e->>'burst')::integer, 1) = l.burst
          AND (e->>'time_zone') IS NOT DISTINCT FROM l.time_zone);
    INSERT INTO edm.service_limits (service_id, name, kind, max_count, window_ms, burst, time_zone)
    SELECT p_service_id, e->>'name', e->>'kind', (e->>'max_count')::integer,
           (e->>'window_ms')::bigint, coalesce((e->>'burst')::integer, 1), e->>'time_zone'
    FROM jsonb_array_elements(p_limits) e
    ON CONFLICT (service_id, name) DO NOTHING;
  EXCEPTION
    WHEN check_violation OR not_null_violation OR invalid_text_representation
         OR numeric_value_out_of_range OR cardinality_violation THEN
      RAISE EXCEPTION 'invalid limit: %', SQLERRM USING ERRCODE = 'ED005';
  END;
  UPDATE edm.services s SET updated_at = now(), quota_exhausted_until = NULL
  WHERE s.service_id = p_service_id;
  PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
  SELECT count(*) INTO v_n FROM edm.service_limits l WHERE l.service_id = p_service_id;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.set_service_limits(bigint,jsonb) IS 'Replaces the extra limits of a service with p_limits, a JSON array of {name, kind: rate|rolling|calendar_day, max_count, window_ms, burst, time_zone}. A limit whose definition is unchanged keeps its state (no fresh burst); one whose max_count alone changes keeps its state too (the sends it counted still count). Raises ED005 for a bad limit (nothing is changed) and ED001 for an unknown service.';
REVOKE ALL ON FUNCTION edm.set_service_limits(bigint,jsonb) FROM PUBLIC;

CREATE VIEW edm.service_limit_status AS
 SELECT s.service_id,
    s.name AS service_name,
    'interval'::text AS limit_name,
    'rate'::text AS kind,
    1 AS max_count,
    s.interval_ms AS window_ms,
    1 AS burst,
        CASE
            WHEN (s.last_sent_at > (now() - ((s.interval_ms)::double precision * '00:00:00.001'::interval))) THEN 1
            ELSE 0
        END AS used,
        CASE
            WHEN (s.last_sent_at > (now() - ((s.interval_ms)::double precision * '00:00:00.001'::interval))) THEN 0
            ELSE 1
        END AS headroom,
        CASE
            WHEN (s.last_sent_at > (now() - ((s.interval_ms)::double precision * '00:00:00.001'::interval))) THEN (s.last_sent_at + ((s.interval_ms)::double precision * '00:00:00.001'::interval))
            ELSE NULL::timestamp with time zone
        END AS next_free_at
   FROM edm.services s
  WHERE (s.interval_ms > 0)
UNION ALL
 SELECT s.service_id,
    s.name AS service_name,
    'daily_quota'::text AS limit_name,
    'calendar_day'::text AS kind,
    s.daily_quota AS max_count,
    NULL::bigint AS window_ms,
    1 AS burst,
    edm.service_sent_today(s.*) AS used,
    GREATEST((s.daily_quota - edm.service_sent_today(s.*)), 0) AS headroom,
        CASE
            WHEN (edm.service_sent_today(s.*) >= s.daily_quota) THEN edm.service_next_quota_day(s.quota_tz, now())
            ELSE NULL::timestamp with time zone
        END AS next_free_at
   FROM edm.services s
UNION ALL
 SELECT x.service_id,
    x.service_name,
    x.limit_name,
    x.kind,
    x.max_count,
    x.window_ms,
    x.burst,
    x.used,
    GREATEST((x.max_count - x.used), 0) AS headroom,
    x.next_free_at
   FROM ( SELECT s.service_id,
            s.name AS service_name,
            l.name AS limit_name,
            l.kind,
            l.max_count,
            l.window_ms,
            l.burst,
                CASE l.kind
                    WHEN 'calendar_day'::text THEN
                    CASE
                        WHEN (l.day = ((now() AT TIME ZONE COALESCE(l.time_zone, s.quota_tz)))::date) THEN l.day_count
                        ELSE 0
                    END
                    WHEN 'rolling'::text THEN ( SELECT (COALESCE(sum(b.n), (0)::bigint))::integer AS "coalesce"
                       FROM UNNEST(l.bucket_idx, l.bucket_n) b(i, n)
                      WHERE ((b.i)::numeric >= (((edm.epoch_ms(now()) / edm.limit_bucket_ms(l.window_ms)))::numeric - ceil(((l.window_ms)::numeric / (edm.limit_bucket_ms(l.window_ms))::numeric)))))
                    ELSE LEAST(l.burst, (GREATEST((0)::numeric, ceil(((EXTRACT(epoch FROM (COALESCE(l.tat, now()) - now())) * (1000)::numeric) / ((l.window_ms)::numeric / (GREATEST(l.max_count, 1))::numeric)))))::integer)
                END AS used,
            NULLIF(edm.limit_next(l.*, now(), s.quota_tz), now()) AS next_free_at
           FROM (edm.service_limits l
             JOIN edm.services s ON ((s.service_id = l.service_id)))) x;
COMMENT ON VIEW edm.service_limit_status IS 'Every limit of every service, built-in (interval, daily_quota) and extra (edm.service_limits), with its use, headroom and when it next admits a send (NULL: now). The limit with the latest next_free_at binds.';
COMMENT ON COLUMN edm.service_limit_status.service_id IS 'Service.';
COMMENT ON COLUMN edm.service_limit_status.service_name IS 'Service name.';
COMMENT ON COLUMN edm.service_limit_status.limit_name IS 'interval, daily_quota, or the name of an extra limit.';
COMMENT ON COLUMN edm.service_limit_status.kind IS 'rate, rolling or calendar_day.';
COMMENT ON COLUMN edm.service_limit_status.max_count IS 'Most sends per window.';
COMMENT ON COLUMN edm.service_limit_status.window_ms IS 'Window in milliseconds (NULL for a calendar day).';
COMMENT ON COLUMN edm.service_limit_status.burst IS 'Most sends at once (rate limits).';
COMMENT ON COLUMN edm.service_limit_status.used IS 'Sends counted in the current window (rate: in the token bucket).';
COMMENT ON COLUMN edm.service_limit_status.headroom IS 'max_count - used, at least 0.';
COMMENT ON COLUMN edm.service_limit_status.next_free_at IS 'When the limit next admits a send; NULL when it does now.';

CREATE TRIGGER service_limits_flag_ins AFTER INSERT ON edm.service_limits REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.service_limits_flag();

CREATE TRIGGER service_limits_flag_del AFTER DELETE ON edm.service_limits REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.service_limits_flag();

-- ==========================================================================
-- Warm-up
-- Ramps of daily ceilings a new IP or account follows (the limit warmup).
-- ==========================================================================

CREATE FUNCTION edm.warmup_ramp_problem(p_ramp integer[])
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN ((p_ramp IS NULL) OR (cardinality(p_ramp) = 0)) THEN 'a ramp needs at least one day'::text WHEN (array_ndims(p_ramp) <> 1) THEN 'a ramp is a one-dimensional array of daily ceilings'::text WHEN (cardinality(p_ramp) > 366) THEN 'a ramp lasts at most 366 days'::text WHEN (array_position(p_ramp, NULL::integer) IS NOT NULL) THEN 'a ramp has no NULL days'::text WHEN (EXISTS (SELECT 1 FROM unnest(warmup_ramp_problem.p_ramp) c(c) WHERE ((c.c < 1) OR (c.c > 100000000)))) THEN 'each daily ceiling is between 1 and 100000000'::text WHEN (EXISTS (SELECT 1 FROM (unnest(warmup_ramp_problem.p_ramp) WITH ORDINALITY a(c, i) JOIN unnest(warmup_ramp_problem.p_ramp) WITH ORDINALITY b(c, i) ON ((b.i = (a.i + 1)))) WHERE (b.c < a.c))) THEN 'a ramp never decreases (each day''s ceiling is at least the day before''s)'::text ELSE NULL::text END;
COMMENT ON FUNCTION edm.warmup_ramp_problem(integer[]) IS 'Why p_ramp is not a valid warm-up ramp (NULL when it is): 1 to 366 daily ceilings, each 1..100000000, never decreasing.';
REVOKE ALL ON FUNCTION edm.warmup_ramp_problem(integer[]) FROM PUBLIC;

CREATE TABLE edm.service_warmups (
  service_id bigint NOT NULL,
  started_on date NOT NULL,
  ramp integer[] NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT service_warmups_pkey PRIMARY KEY (service_id),
  CONSTRAINT service_warmups_service_id_fkey FOREIGN KEY (service_id) REFERENCES edm.services(service_id) ON DELETE CASCADE,
  CONSTRAINT service_warmups_ramp_check CHECK (((edm.warmup_ramp_problem(ramp) IS NULL) AND (array_lower(ramp, 1) = 1))),
  CONSTRAINT service_warmups_started_on_check CHECK (isfinite(started_on))
);
COMMENT ON TABLE edm.service_warmups IS 'Services warming up: on local day n of the ramp (day 1 = started_on, in the service''s quota_tz) the service sends at most ramp[n]. Enforced by the calendar_day limit ''warmup'' in edm.service_limits, whose max_count edm.apply_warmups keeps at the day''s ceiling; the row and the limit go away after the last day. Set with edm.set_service_warmup; see docs/explanation/traffic-shaping.md.';
COMMENT ON COLUMN edm.service_warmups.service_id IS 'Service warming up.';
COMMENT ON COLUMN edm.service_warmups.started_on IS 'Local date (in the service''s quota_tz) of day 1 of the ramp.';
COMMENT ON COLUMN edm.service_warmups.ramp IS 'Daily ceilings, day 1 first; never decreasing, 1 to 366 days.';
COMMENT ON COLUMN edm.service_warmups.created_at IS 'When the warm-up was first set.';
COMMENT ON COLUMN edm.service_warmups.updated_at IS 'When the ramp or its start was last changed.';

CREATE FUNCTION edm.warmup_ramp(p_start integer, p_full integer, p_factor numeric DEFAULT 2)
 RETURNS integer[]
 LANGUAGE plpgsql
 IMMUTABLE PARALLEL SAFE
AS $function$
DECLARE
  v_ramp integer[];
  v_c integer;
BEGIN
  IF p_start IS NULL OR p_full IS NULL OR p_factor IS NULL OR p_start < 1
     OR p_full < p_start OR p_full > 100000000 OR p_factor <= 1 OR p_factor > 100 THEN
    RAISE EXCEPTION 'warmup_ramp: need 1 <= start <= full <= 100000000 and 1 < factor <= 100, got %, %, %',
      p_start, p_full, p_factor USING ERRCODE = 'ED005';
  END IF;
  v_c := p_start;
  v_ramp := ARRAY[v_c];
  WHILE v_c < p_full LOOP
    v_c := least(p_full, ceil(v_c * p_factor))::integer;
    v_ramp := v_ramp || v_c;
    IF cardinality(v_ramp) > 366 THEN
      RAISE EXCEPTION 'warmup_ramp: from % to % by a factor of % takes more than 366 days',
        p_start, p_full, p_factor USING ERRCODE = 'ED005';
    END IF;
  END LOOP;
  RETURN v_ramp;
END;
$function$;
COMMENT ON FUNCTION edm.warmup_ramp(integer,integer,numeric) IS 'A growing warm-up ramp: p_start on day 1, then each day the day before''s ceiling times p_factor (rounded up) until p_full, the last day. warmup_ramp(50, 1000) = {50,100,200,400,800,1000}. Raises ED005 for bad bounds or a ramp longer than 366 days.';
REVOKE ALL ON FUNCTION edm.warmup_ramp(integer,integer,numeric) FROM PUBLIC;

CREATE FUNCTION edm.warmup_ceiling(p_ramp integer[], p_started_on date, p_day date)
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (p_day < p_started_on) THEN (p_ramp)[1] WHEN (((p_day - p_started_on) + 1) > cardinality(p_ramp)) THEN NULL::integer ELSE (p_ramp)[((p_day - p_started_on) + 1)] END;
COMMENT ON FUNCTION edm.warmup_ceiling(integer[],date,date) IS 'The ceiling of local day p_day on ramp p_ramp started on p_started_on (day 1): the ramp''s first value before the start, NULL after its last day (the warm-up is over).';
REVOKE ALL ON FUNCTION edm.warmup_ceiling(integer[],date,date) FROM PUBLIC;

CREATE FUNCTION edm.apply_warmups(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone, p_service_id bigint DEFAULT NULL::bigint)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now     timestamptz := coalesce(p_now, now());
  w         record;
  l         record;
  v_today   date;
  v_ceiling integer;
  v_n       integer := 0;
BEGIN
  -- Lock order as the claim's: the service row, then its limits. Only the
  -- services with something to do are locked (claims skip a locked service
  -- until the sweep commits): on most sweeps, none. Nothing to do: the limit
  -- holds the day's ceiling, or the ramp is over and the limit still counts
  -- its last day (kept, see below).
  FOR w IN
    SELECT x.service_id, x.ramp, x.started_on, s.quota_tz, s.quota_day, s.sent_today
    FROM edm.service_warmups x JOIN edm.services s ON s.service_id = x.service_id
    CROSS JOIN LATERAL (SELECT (v_now AT TIME ZONE s.quota_tz)::date AS today) d
    WHERE (p_service_id IS NULL OR x.service_id = p_service_id)
      AND NOT EXISTS (
        SELECT 1 FROM edm.service_limits sl
        WHERE sl.service_id = x.service_id AND sl.name = 'warmup'
          AND (sl.max_count = edm.warmup_ceiling(x.ramp, x.started_on, d.today)
               OR (edm.warmup_ceiling(x.ramp, x.started_on, d.today) IS NULL
                   AND sl.day = d.today - 1
                   AND edm.warmup_ceiling(x.ramp, x.started_on, sl.day) IS NOT NULL)))
    ORDER BY x.service_id
    FOR NO KEY UPDATE OF s
  LOOP
    v_today := (v_now AT TIME ZONE w.quota_tz)::date;
    v_ceiling := edm.warmup_ceiling(w.ramp, w.started_on, v_today);
    SELECT sl.max_count, sl.day INTO l FROM edm.service_limits sl
    WHERE sl.service_id = w.service_id AND sl.name = 'warmup'
    FOR UPDATE;
    IF v_ceiling IS NULL THEN
      -- The ramp is over. Keep the last ceiling while the limit still counts
      -- the ramp's last day (a late slot of that day may come); it goes at
      -- the first sweep after the state has moved on.
      CONTINUE WHEN l.day IS NOT NULL AND l.day = v_today - 1
                    AND edm.warmup_ceiling(w.ramp, w.started_on, l.day) IS NOT NULL;
      DELETE FROM edm.service_warmups x WHERE x.service_id = w.service_id;
      DELETE FROM edm.service_limits sl WHERE sl.service_id = w.service_id AND sl.name = 'warmup';
      PERFORM pg_notify('edm_wakeup', 'service:' || w.service_id);
      v_n := v_n + 1;
    ELSIF l.max_count IS NULL THEN
      -- New: today's sends so far count (the service's own count of its quota day).
      INSERT INTO edm.service_limits (service_id, name, kind, max_count, day, day_count)
      VALUES (w.service_id, 'warmup', 'calendar_day', v_ceiling, v_today,
              CASE WHEN w.quota_day = v_today THEN w.sent_today ELSE 0 END);
      v_n := v_n + 1;
    ELSIF l.max_count <> v_ceiling THEN
      -- In place, state kept. A count of an earlier day moves by the change,
      -- so that day keeps the headroom it had under its own ceiling.
      UPDATE edm.service_limits sl
      SET max_count = v_ceiling,
          day_count = CASE WHEN sl.day < v_today
                           THEN greatest(0, sl.day_count + v_ceiling - sl.max_count)
                           ELSE sl.day_count END
      WHERE sl.service_id = w.service_id AND sl.name = 'warmup';
      IF v_ceiling > l.max_count THEN
        -- a block computed under the lower ceiling is re-decided by the next claim
        UPDATE edm.services s SET quota_exhausted_until = NULL WHERE s.service_id = w.service_id;
        PERFORM pg_notify('edm_wakeup', 'service:' || w.service_id);
      END IF;
      v_n := v_n + 1;
    END IF;
  END LOOP;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.apply_warmups(timestamp with time zone,bigint) IS 'Sets the limit ''warmup'' of each warming-up service (or of p_service_id only) to the ceiling of its current local day at p_now, in place (its count kept); after the ramp''s last day removes the limit and the warm-up. Run by every sweep (edm.run_sweeps) and by edm.set_service_warmup. Returns how many services changed.';
REVOKE ALL ON FUNCTION edm.apply_warmups(timestamp with time zone,bigint) FROM PUBLIC;

CREATE FUNCTION edm.set_service_warmup(p_service_id bigint, p_ramp integer[], p_started_on date DEFAULT NULL::date, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_tz text;
  v_problem text;
BEGIN
  SELECT s.quota_tz INTO v_tz FROM edm.services s WHERE s.service_id = p_service_id
  FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  IF p_ramp IS NULL OR cardinality(p_ramp) = 0 THEN
    -- End the warm-up now: the limit goes with it.
    DELETE FROM edm.service_warmups w WHERE w.service_id = p_service_id;
    IF FOUND THEN
      DELETE FROM edm.service_limits l WHERE l.service_id = p_service_id AND l.name = 'warmup';
      PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
    END IF;
    RETURN NULL;
  END IF;
  v_problem := edm.warmup_ramp_problem(p_ramp);
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'invalid warm-up ramp: %', v_problem USING ERRCODE = 'ED005';
  END IF;
  IF p_started_on IS NOT NULL AND NOT isfinite(p_started_on) THEN
    RAISE EXCEPTION 'invalid warm-up start: %', p_started_on USING ERRCODE = 'ED005';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM edm.service_warmups w WHERE w.service_id = p_service_id)
     AND EXISTS (SELECT 1 FROM edm.service_limits l
                 WHERE l.service_id = p_service_id AND l.name = 'warmup') THEN
    RAISE EXCEPTION 'service % has a limit of its own named warmup: rename it first (edm.set_service_limits)',
      p_service_id USING ERRCODE = 'ED005';
  END IF;
  INSERT INTO edm.service_warmups (service_id, started_on, ramp)
  VALUES (p_service_id,
          coalesce(p_started_on, (coalesce(p_now, now()) AT TIME ZONE v_tz)::date),
          ARRAY(SELECT c FROM unnest(p_ramp) WITH ORDINALITY u(c, i) ORDER BY i))
  ON CONFLICT (service_id) DO UPDATE
    SET started_on = EXCLUDED.started_on, ramp = EXCLUDED.ramp, updated_at = now();
  PERFORM edm.apply_warmups(p_now, p_service_id);
  RETURN (SELECT l.max_count FROM edm.service_limits l
          WHERE l.service_id = p_service_id AND l.name = 'warmup');
END;
$function$;
COMMENT ON FUNCTION edm.set_service_warmup(bigint,integer[],date,timestamp with time zone) IS 'Puts service p_service_id on warm-up ramp p_ramp (daily ceilings, day 1 first, never decreasing; see edm.warmup_ramp) from local date p_started_on (default: today in its quota_tz), replacing a ramp it had, and applies today''s ceiling at once. A NULL or empty ramp ends the warm-up and removes its limit. Returns the ceiling in force (NULL when none). Raises ED001 for an unknown service, ED005 for a bad ramp (nothing is changed).';
REVOKE ALL ON FUNCTION edm.set_service_warmup(bigint,integer[],date,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.service_limits_keep_warmup()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  -- The service row is gone when this is the cascade of its deletion: let it go.
  IF EXISTS (SELECT 1 FROM edm.service_warmups w WHERE w.service_id = OLD.service_id)
     AND EXISTS (SELECT 1 FROM edm.services s WHERE s.service_id = OLD.service_id) THEN
    RETURN NULL;
  END IF;
  RETURN OLD;
END;
$function$;
COMMENT ON FUNCTION edm.service_limits_keep_warmup() IS 'Row trigger on edm.service_limits: the limit ''warmup'' of a service that is warming up is not deleted (edm.set_service_limits replacing the other limits keeps it, with its state); it goes when the warm-up ends.';
REVOKE ALL ON FUNCTION edm.service_limits_keep_warmup() FROM PUBLIC;

CREATE VIEW edm.service_warmup_status AS
 SELECT w.service_id,
    s.name AS service_name,
    w.started_on,
    ((x.today - w.started_on) + 1) AS day,
    cardinality(w.ramp) AS days,
        CASE
            WHEN (x.today < w.started_on) THEN 'scheduled'::text
            WHEN (((x.today - w.started_on) + 1) > cardinality(w.ramp)) THEN 'ended'::text
            ELSE 'ramping'::text
        END AS state,
    edm.warmup_ceiling(w.ramp, w.started_on, x.today) AS ceiling_today,
    l.max_count AS ceiling_in_force,
        CASE
            WHEN (l.day = x.today) THEN l.day_count
            ELSE 0
        END AS used_today,
    edm.warmup_ceiling(w.ramp, w.started_on, (x.today + 1)) AS ceiling_tomorrow,
    w.ramp[cardinality(w.ramp)] AS final_ceiling,
    edm.service_next_quota_day(s.quota_tz, now()) AS next_day_at,
    w.ramp
   FROM (((edm.service_warmups w
     JOIN edm.services s ON ((s.service_id = w.service_id)))
     CROSS JOIN LATERAL ( SELECT ((now() AT TIME ZONE s.quota_tz))::date AS today) x)
     LEFT JOIN edm.service_limits l ON (((l.service_id = w.service_id) AND (l.name = 'warmup'::text))));
COMMENT ON VIEW edm.service_warmup_status IS 'Each warming-up service: day n of N of its ramp (local days in its quota_tz), today''s ceiling, the ceiling in force in its limit ''warmup'' (it follows the ramp at each sweep), sends counted today and tomorrow''s ceiling.';
COMMENT ON COLUMN edm.service_warmup_status.service_id IS 'Service.';
COMMENT ON COLUMN edm.service_warmup_status.service_name IS 'Service name.';
COMMENT ON COLUMN edm.service_warmup_status.started_on IS 'Local date of day 1.';
COMMENT ON COLUMN edm.service_warmup_status.day IS 'Today''s day of the ramp (day n of days; below 1 before the start, above days once over).';
COMMENT ON COLUMN edm.service_warmup_status.days IS 'Length of the ramp in days.';
COMMENT ON COLUMN edm.service_warmup_status.state IS 'scheduled (before day 1), ramping, or ended (past the last day; the warm-up and its limit go at the first sweep once the limit no longer counts the last day).';
COMMENT ON COLUMN edm.service_warmup_status.ceiling_today IS 'The ramp''s ceiling for today (NULL once ended).';
COMMENT ON COLUMN edm.service_warmup_status.ceiling_in_force IS 'max_count of the limit ''warmup'' now: the ceiling the claim applies (an earlier, lower day''s until the first sweep of the day).';
COMMENT ON COLUMN edm.service_warmup_status.used_today IS 'Sends counted by the limit ''warmup'' for today.';
COMMENT ON COLUMN edm.service_warmup_status.ceiling_tomorrow IS 'The ramp''s ceiling for tomorrow (NULL when the ramp ends today).';
COMMENT ON COLUMN edm.service_warmup_status.final_ceiling IS 'The ramp''s last ceiling.';
COMMENT ON COLUMN edm.service_warmup_status.next_day_at IS 'When the next local day (and its ceiling) starts.';
COMMENT ON COLUMN edm.service_warmup_status.ramp IS 'The whole ramp, day 1 first.';

CREATE TRIGGER service_limits_keep_warmup BEFORE DELETE ON edm.service_limits FOR EACH ROW WHEN ((old.name = 'warmup'::text)) EXECUTE FUNCTION edm.service_limits_keep_warmup();

-- ==========================================================================
-- Sites
-- Receiving mailbox providers: the domains that share their throttles, and suspensions of a (service, site).
-- ==========================================================================

CREATE TABLE edm.sites (
  site text NOT NULL,
  description text DEFAULT ''::text NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT sites_pkey PRIMARY KEY (site),
  CONSTRAINT sites_description_check CHECK ((length(description) <= 500)),
  CONSTRAINT sites_site_check CHECK ((site ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'::text))
);
COMMENT ON TABLE edm.sites IS 'Destination sites: a receiving mail system that throttles as one (google, microsoft, yahoo...). Recipient domains map to sites in edm.site_domains; limits and suspensions are set per site. See docs/explanation/traffic-shaping.md.';
COMMENT ON COLUMN edm.sites.site IS 'Name of the site (lower case letters, digits, _ . -; at most 64).';
COMMENT ON COLUMN edm.sites.description IS 'Free text: whose mail system this is.';
COMMENT ON COLUMN edm.sites.created_at IS 'When the site was defined.';
INSERT INTO edm.sites (site, description) VALUES
  ('apple', 'iCloud Mail'),
  ('comcast', 'Comcast Xfinity'),
  ('gmx', 'GMX and WEB.DE (United Internet)'),
  ('google', 'Gmail and Google Workspace'),
  ('mailru', 'Mail.ru Group'),
  ('microsoft', 'Outlook.com, Hotmail, Live, MSN and Microsoft 365'),
  ('netease', 'NetEase (163, 126, yeah.net)'),
  ('qq', 'Tencent QQ Mail'),
  ('yahoo', 'Yahoo Mail and AOL');

CREATE TABLE edm.site_domains (
  domain text NOT NULL,
  site text NOT NULL,
  source text DEFAULT 'admin'::text NOT NULL,
  resolved_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT site_domains_pkey PRIMARY KEY (domain),
  CONSTRAINT site_domains_site_fkey FOREIGN KEY (site) REFERENCES edm.sites(site) ON UPDATE CASCADE ON DELETE CASCADE,
  CONSTRAINT site_domains_domain_check CHECK (((domain = lower(domain)) AND ((length(domain) >= 1) AND (length(domain) <= 253)) AND (domain !~ '[[:space:][:cntrl:]@]'::text))),
  CONSTRAINT site_domains_source_check CHECK ((source = ANY (ARRAY['shipped'::text, 'admin'::text, 'resolved'::text])))
);
COMMENT ON TABLE edm.site_domains IS 'Which site a recipient domain belongs to. shipped rows come with edm-sched, admin rows are set by the host or a DBA (edm.set_site_domains), resolved rows were answered by the host''s resolver hook for a domain not mapped before (edm.cache_site_domains). A domain not listed has no site.';
COMMENT ON COLUMN edm.site_domains.domain IS 'Recipient domain, lower case, exactly as after the @ (subdomains are separate domains).';
COMMENT ON COLUMN edm.site_domains.site IS 'Site the domain belongs to.';
COMMENT ON COLUMN edm.site_domains.source IS 'shipped (a default of edm-sched), admin (set by the host or a DBA) or resolved (cached answer of the host''s resolver hook).';
COMMENT ON COLUMN edm.site_domains.resolved_at IS 'When the mapping was set or last resolved (a host may re-resolve old resolved rows).';
CREATE INDEX site_domains_site_idx ON edm.site_domains USING btree (site);
COMMENT ON INDEX edm.site_domains_site_idx IS 'The domains of a site (listing a site, and the ON DELETE CASCADE from edm.sites).';
INSERT INTO edm.site_domains (domain, site, source) VALUES
  ('126.com', 'netease', 'shipped'),
  ('163.com', 'netease', 'shipped'),
  ('188.com', 'netease', 'shipped'),
  ('aim.com', 'yahoo', 'shipped'),
  ('aol.com', 'yahoo', 'shipped'),
  ('bk.ru', 'mailru', 'shipped'),
  ('comcast.net', 'comcast', 'shipped'),
  ('foxmail.com', 'qq', 'shipped'),
  ('gmail.com', 'google', 'shipped'),
  ('gmx.at', 'gmx', 'shipped'),
  ('gmx.ch', 'gmx', 'shipped'),
  ('gmx.com', 'gmx', 'shipped'),
  ('gmx.de', 'gmx', 'shipped'),
  ('gmx.net', 'gmx', 'shipped'),
  ('googlemail.com', 'google', 'shipped'),
  ('hotmail.co.uk', 'microsoft', 'shipped'),
  ('hotmail.com', 'microsoft', 'shipped'),
  ('hotmail.de', 'microsoft', 'shipped'),
  ('hotmail.es', 'microsoft', 'shipped'),
  ('hotmail.fr', 'microsoft', 'shipped'),
  ('hotmail.it', 'microsoft', 'shipped'),
  ('icloud.com', 'apple', 'shipped'),
  ('inbox.ru', 'mailru', 'shipped'),
  ('internet.ru', 'mailru', 'shipped'),
  ('list.ru', 'mailru', 'shipped'),
  ('live.co.uk', 'microsoft', 'shipped'),
  ('live.com', 'microsoft', 'shipped'),
  ('live.fr', 'microsoft', 'shipped'),
  ('mac.com', 'apple', 'shipped'),
  ('mail.ru', 'mailru', 'shipped'),
  ('me.com', 'apple', 'shipped'),
  ('msn.com', 'microsoft', 'shipped'),
  ('outlook.com', 'microsoft', 'shipped'),
  ('outlook.de', 'microsoft', 'shipped'),
  ('outlook.fr', 'microsoft', 'shipped'),
  ('passport.com', 'microsoft', 'shipped'),
  ('qq.com', 'qq', 'shipped'),
  ('rocketmail.com', 'yahoo', 'shipped'),
  ('verizon.net', 'yahoo', 'shipped'),
  ('web.de', 'gmx', 'shipped'),
  ('yahoo.co.jp', 'yahoo', 'shipped'),
  ('yahoo.co.uk', 'yahoo', 'shipped'),
  ('yahoo.com', 'yahoo', 'shipped'),
  ('yahoo.de', 'yahoo', 'shipped'),
  ('yahoo.fr', 'yahoo', 'shipped'),
  ('yeah.net', 'netease', 'shipped'),
  ('ymail.com', 'yahoo', 'shipped');

CREATE TABLE edm.site_suspensions (
  service_id bigint NOT NULL,
  site text NOT NULL,
  until timestamp with time zone NOT NULL,
  level integer DEFAULT 1 NOT NULL,
  reason text NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT site_suspensions_pkey PRIMARY KEY (service_id, site),
  CONSTRAINT site_suspensions_service_id_fkey FOREIGN KEY (service_id) REFERENCES edm.services(service_id) ON DELETE CASCADE,
  CONSTRAINT site_suspensions_site_fkey FOREIGN KEY (site) REFERENCES edm.sites(site) ON UPDATE CASCADE ON DELETE CASCADE,
  CONSTRAINT site_suspensions_level_check CHECK (((level >= 1) AND (level <= 1000))),
  CONSTRAINT site_suspensions_reason_check CHECK ((length(reason) <= 2000))
);
COMMENT ON TABLE edm.site_suspensions IS 'A (service, site) pair that must not send until a time: set by a reply rule (a throttling answer such as Gmail''s 421 4.7.28) or by hand. The claim skips the pair''s recipients and serves the service''s other sites. A row past its until no longer applies (it expires by itself) but keeps its level for escalation on repeats.';
COMMENT ON COLUMN edm.site_suspensions.service_id IS 'Service suspended for the site.';
COMMENT ON COLUMN edm.site_suspensions.site IS 'Site the service must not send to.';
COMMENT ON COLUMN edm.site_suspensions.until IS 'End of the suspension (it no longer applies from then).';
COMMENT ON COLUMN edm.site_suspensions.level IS 'How many times in a row the pair was suspended (escalation: each repeat may last longer).';
COMMENT ON COLUMN edm.site_suspensions.reason IS 'Why: the rule and the reply that caused the suspension, or the text given by hand.';
COMMENT ON COLUMN edm.site_suspensions.created_at IS 'When the current suspension started.';
CREATE INDEX site_suspensions_until_idx ON edm.site_suspensions USING btree (until);
COMMENT ON INDEX edm.site_suspensions_until_idx IS 'Suspensions by end (which are in force at a time; sweeping old ones).';

CREATE FUNCTION edm.site_of(p_email text)
 RETURNS text
 LANGUAGE sql
 STABLE PARALLEL SAFE
RETURN (SELECT d.site FROM edm.site_domains d WHERE (d.domain = edm.email_domain(site_of.p_email)));
COMMENT ON FUNCTION edm.site_of(text) IS 'The site a recipient address belongs to (edm.site_domains, by the domain after its last @), or NULL when its domain is not mapped.';
REVOKE ALL ON FUNCTION edm.site_of(text) FROM PUBLIC;

CREATE FUNCTION edm.sites_of(p_emails text[])
 RETURNS text[]
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
RETURN (SELECT COALESCE(array_agg(edm.site_of(e.email) ORDER BY e.n), '{}'::text[]) AS "coalesce" FROM unnest(sites_of.p_emails) WITH ORDINALITY e(email, n));
COMMENT ON FUNCTION edm.sites_of(text[]) IS 'The site of each address of p_emails (edm.site_of), in order, NULL where its domain is not mapped. Used by the dispatcher to hand back the queued sends of a (service, site) pair a reply rule has just suspended. Runs with the owner''s rights, so the dispatcher role needs no read access to edm.site_domains.';
REVOKE ALL ON FUNCTION edm.sites_of(text[]) FROM PUBLIC;

CREATE FUNCTION edm.set_site_domains(p_site text, p_domains text[], p_description text DEFAULT NULL::text)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  IF p_site IS NULL OR p_site !~ '^[a-z0-9][a-z0-9_.-]{0,63}$' THEN
    RAISE EXCEPTION 'site name must be 1 to 64 of a-z 0-9 _ . - (starting with a letter or digit), got %',
      p_site USING ERRCODE = 'ED005';
  END IF;
  IF p_domains IS NULL OR cardinality(p_domains) > 10000
     OR array_position(p_domains, NULL) IS NOT NULL
     OR EXISTS (SELECT 1 FROM unnest(p_domains) d
                WHERE length(d) NOT BETWEEN 1 AND 253 OR d ~ '[[:space:][:cntrl:]@]') THEN
    RAISE EXCEPTION 'domains must be at most 10000 non-empty host names (no @, no spaces)'
      USING ERRCODE = 'ED005';
  END IF;
  IF p_description IS NOT NULL AND length(p_description) > 500 THEN
    RAISE EXCEPTION 'site description must be at most 500 characters' USING ERRCODE = 'ED005';
  END IF;
  INSERT INTO edm.sites (site, description) VALUES (p_site, coalesce(p_description, ''))
  ON CONFLICT (site) DO UPDATE SET description = coalesce(p_description, edm.sites.description);
  INSERT INTO edm.site_domains (domain, site, source, resolved_at)
  SELECT DISTINCT lower(d), p_site, 'admin', now() FROM unnest(p_domains) d
  ON CONFLICT (domain) DO UPDATE SET site = EXCLUDED.site, source = 'admin',
                                     resolved_at = EXCLUDED.resolved_at;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.set_site_domains(text,text[],text) IS 'Defines site p_site (created if new; its description replaced when p_description is given) and maps each of p_domains to it (moving a domain from another site). Returns how many domains were mapped. Raises ED005 for a bad name or domain (nothing is changed).';
REVOKE ALL ON FUNCTION edm.set_site_domains(text,text[],text) FROM PUBLIC;

CREATE FUNCTION edm.cache_site_domains(p_domains text[], p_sites text[], p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  IF p_domains IS NULL OR p_sites IS NULL OR cardinality(p_domains) <> cardinality(p_sites)
     OR cardinality(p_domains) > 10000 THEN
    RAISE EXCEPTION 'cache_site_domains: domains and sites must be arrays of the same length (at most 10000)'
      USING ERRCODE = 'ED005';
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(p_domains, p_sites) x(d, s)
             WHERE d IS NULL OR length(d) NOT BETWEEN 1 AND 253 OR d ~ '[[:space:][:cntrl:]@]'
                OR s IS NULL OR s !~ '^[a-z0-9][a-z0-9_.-]{0,63}$') THEN
    RAISE EXCEPTION 'cache_site_domains: a domain is not a host name or a site name is not valid'
      USING ERRCODE = 'ED005';
  END IF;
  INSERT INTO edm.sites (site, description)
  SELECT DISTINCT s, 'found by the resolver hook' FROM unnest(p_sites) s
  ON CONFLICT (site) DO NOTHING;
  -- A resolver answer never overrides what an admin or edm-sched set.
  INSERT INTO edm.site_domains AS d (domain, site, source, resolved_at)
  SELECT DISTINCT ON (lower(x.d)) lower(x.d), x.s, 'resolved', coalesce(p_now, now())
  FROM unnest(p_domains, p_sites) x(d, s)
  ORDER BY lower(x.d)
  ON CONFLICT (domain) DO UPDATE SET site = EXCLUDED.site, resolved_at = EXCLUDED.resolved_at
    WHERE d.source = 'resolved';
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.cache_site_domains(text[],text[],timestamp with time zone) IS 'Caches the host resolver hook''s answers: maps each p_domains[i] to site p_sites[i] (creating unknown sites) as source resolved. Never overrides a shipped or admin mapping. Returns how many rows were written.';
REVOKE ALL ON FUNCTION edm.cache_site_domains(text[],text[],timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.unmapped_domains(p_domains text[])
 RETURNS SETOF text
 LANGUAGE sql
 STABLE
BEGIN ATOMIC
 SELECT DISTINCT lower(x.d) AS domain
    FROM unnest(unmapped_domains.p_domains) x(d)
   WHERE ((x.d IS NOT NULL) AND (NOT (EXISTS ( SELECT 1
            FROM edm.site_domains sd
           WHERE (sd.domain = lower(x.d))))))
   ORDER BY (lower(x.d));
END;
COMMENT ON FUNCTION edm.unmapped_domains(text[]) IS 'Those of p_domains (lower-cased, distinct) that edm.site_domains does not map: what a resolver hook has to answer.';
REVOKE ALL ON FUNCTION edm.unmapped_domains(text[]) FROM PUBLIC;

CREATE FUNCTION edm.suspend_site(p_service_id bigint, p_site text, p_until timestamp with time zone, p_reason text DEFAULT 'suspended by hand'::text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  IF p_until IS NULL OR p_reason IS NULL OR length(p_reason) > 2000 THEN
    RAISE EXCEPTION 'suspend_site: until and a reason of at most 2000 characters are required'
      USING ERRCODE = 'ED005';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM edm.services s WHERE s.service_id = p_service_id) THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM edm.sites s WHERE s.site = p_site) THEN
    RAISE EXCEPTION 'unknown site %', p_site USING ERRCODE = 'ED001';
  END IF;
  INSERT INTO edm.site_suspensions (service_id, site, until, level, reason, created_at)
  VALUES (p_service_id, p_site, p_until, 1, p_reason, now())
  ON CONFLICT (service_id, site) DO UPDATE
    SET until = EXCLUDED.until, reason = EXCLUDED.reason, created_at = EXCLUDED.created_at;
  PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
END;
$function$;
COMMENT ON FUNCTION edm.suspend_site(bigint,text,timestamp with time zone,text) IS 'Suspends (service, site) until p_until by hand (an until in the past lifts it). Raises ED001 for an unknown service or site.';
REVOKE ALL ON FUNCTION edm.suspend_site(bigint,text,timestamp with time zone,text) FROM PUBLIC;

CREATE FUNCTION edm.suspended_sites(p_service_id bigint, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS text[]
 LANGUAGE sql
 STABLE
RETURN ARRAY(SELECT x.site FROM edm.site_suspensions x WHERE ((x.service_id = suspended_sites.p_service_id) AND (x.until > COALESCE(suspended_sites.p_now, now()))) ORDER BY x.site);
COMMENT ON FUNCTION edm.suspended_sites(bigint,timestamp with time zone) IS 'The sites service p_service_id must not send to at p_now (its suspensions not yet expired).';
REVOKE ALL ON FUNCTION edm.suspended_sites(bigint,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.lift_site_suspension(p_service_id bigint, p_site text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_in_force boolean;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM edm.services s WHERE s.service_id = p_service_id) THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  -- The row goes, and with it the escalation level: the next throttle starts
  -- from the rule's base duration (the action log keeps the history).
  DELETE FROM edm.site_suspensions x
  WHERE x.service_id = p_service_id AND x.site = p_site
  RETURNING x.until > v_now INTO v_in_force;
  IF NOT coalesce(v_in_force, false) THEN
    RETURN false;
  END IF;
  PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
  RETURN true;
END;
$function$;
COMMENT ON FUNCTION edm.lift_site_suspension(bigint,text,timestamp with time zone) IS 'Ends the suspension of (service, site) now and forgets its escalation level (the row is deleted; edm.shaping_actions keeps the history); true when one was in force. Raises ED001 for an unknown service.';
REVOKE ALL ON FUNCTION edm.lift_site_suspension(bigint,text,timestamp with time zone) FROM PUBLIC;

-- ==========================================================================
-- Traffic shaping
-- Limits beyond a service's own — global, per site, per (service, site), per user, per task — held at once by the claim; see docs/explanation/traffic-shaping.md.
-- ==========================================================================

CREATE FUNCTION edm.shaping_key(p_scope text, p_site text, p_service_id bigint, p_user_id text, p_task_id bigint)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ((((((((p_scope || '|'::text) || COALESCE((p_service_id)::text, ''::text)) || '|'::text) || COALESCE(p_site, ''::text)) || '|'::text) || COALESCE((p_task_id)::text, ''::text)) || '|'::text) || COALESCE(p_user_id, ''::text));
COMMENT ON FUNCTION edm.shaping_key(text,text,bigint,text,bigint) IS 'The key of one shaping scope (edm.shaping_limits.scope_key): scope|service|site|task|user, empty where the scope has no such part.';
REVOKE ALL ON FUNCTION edm.shaping_key(text,text,bigint,text,bigint) FROM PUBLIC;

CREATE TABLE edm.shaping_limits (
  scope text NOT NULL,
  site text,
  service_id bigint,
  user_id text,
  task_id bigint,
  scope_key text GENERATED ALWAYS AS (edm.shaping_key(scope, site, service_id, user_id, task_id)) STORED NOT NULL,
  name text NOT NULL,
  kind text NOT NULL,
  max_count integer NOT NULL,
  window_ms bigint,
  burst integer DEFAULT 1 NOT NULL,
  time_zone text,
  tat timestamp with time zone,
  bucket_idx bigint[] DEFAULT '{}'::bigint[] NOT NULL,
  bucket_n integer[] DEFAULT '{}'::integer[] NOT NULL,
  day date,
  day_count integer DEFAULT 0 NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT shaping_limits_pkey PRIMARY KEY (scope_key, name),
  CONSTRAINT shaping_limits_service_id_fkey FOREIGN KEY (service_id) REFERENCES edm.services(service_id) ON DELETE CASCADE,
  CONSTRAINT shaping_limits_site_fkey FOREIGN KEY (site) REFERENCES edm.sites(site) ON UPDATE CASCADE ON DELETE CASCADE,
  CONSTRAINT shaping_limits_task_id_fkey FOREIGN KEY (task_id) REFERENCES edm.tasks(task_id) ON DELETE CASCADE,
  CONSTRAINT shaping_limits_user_id_fkey FOREIGN KEY (user_id) REFERENCES edm.users(user_id) ON DELETE CASCADE,
  CONSTRAINT shaping_limits_buckets CHECK ((cardinality(bucket_idx) = cardinality(bucket_n))),
  CONSTRAINT shaping_limits_burst_check CHECK (((burst >= 1) AND (burst <= 100000))),
  CONSTRAINT shaping_limits_day_count_check CHECK ((day_count >= 0)),
  CONSTRAINT shaping_limits_kind_check CHECK ((kind = ANY (ARRAY['rate'::text, 'rolling'::text, 'calendar_day'::text]))),
  CONSTRAINT shaping_limits_max_count_check CHECK (((max_count >= 0) AND (max_count <= 100000000))),
  CONSTRAINT shaping_limits_name_check CHECK ((name ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'::text)),
  CONSTRAINT shaping_limits_scope_check CHECK ((scope = ANY (ARRAY['global'::text, 'site'::text, 'service_site'::text, 'user'::text, 'task'::text]))),
  CONSTRAINT shaping_limits_shape CHECK (
CASE kind
    WHEN 'calendar_day'::text THEN ((window_ms IS NULL) AND (burst = 1))
    WHEN 'rolling'::text THEN ((window_ms IS NOT NULL) AND (window_ms >= 1000) AND (burst = 1) AND (time_zone IS NULL))
    ELSE ((window_ms IS NOT NULL) AND (time_zone IS NULL) AND (burst <= GREATEST(max_count, 1)))
END),
  CONSTRAINT shaping_limits_target CHECK (
CASE scope
    WHEN 'global'::text THEN ((site IS NULL) AND (service_id IS NULL) AND (user_id IS NULL) AND (task_id IS NULL))
    WHEN 'site'::text THEN ((site IS NOT NULL) AND (service_id IS NULL) AND (user_id IS NULL) AND (task_id IS NULL))
    WHEN 'service_site'::text THEN ((site IS NOT NULL) AND (service_id IS NOT NULL) AND (user_id IS NULL) AND (task_id IS NULL))
    WHEN 'user'::text THEN ((user_id IS NOT NULL) AND (site IS NULL) AND (service_id IS NULL) AND (task_id IS NULL))
    ELSE ((task_id IS NOT NULL) AND (site IS NULL) AND (service_id IS NULL) AND (user_id IS NULL))
END),
  CONSTRAINT shaping_limits_time_zone_check CHECK (((time_zone IS NULL) OR edm.is_valid_timezone(time_zone))),
  CONSTRAINT shaping_limits_window_ms_check CHECK (((window_ms >= 1) AND (window_ms <= (31 * (86400000)::bigint))))
);
COMMENT ON TABLE edm.shaping_limits IS 'Traffic-shaping limits beyond a service''s own (edm.service_limits), in the same form (rate with burst, rolling window, calendar day) and all held at once by the claim: global (every send), site (one destination site across all services), service_site (one service to one site), user (a tenant''s plan) and task (a campaign''s maximum rate). A calendar_day limit without time_zone counts UTC days. Set with edm.set_global_limits, edm.set_site_limits, edm.set_user_limits and edm.set_task_limits; see docs/explanation/traffic-shaping.md.';
COMMENT ON COLUMN edm.shaping_limits.scope IS 'global, site, service_site, user or task.';
COMMENT ON COLUMN edm.shaping_limits.site IS 'site and service_site scopes: the destination site.';
COMMENT ON COLUMN edm.shaping_limits.service_id IS 'service_site scope: the sending service.';
COMMENT ON COLUMN edm.shaping_limits.user_id IS 'user scope: the tenant.';
COMMENT ON COLUMN edm.shaping_limits.task_id IS 'task scope: the campaign.';
COMMENT ON COLUMN edm.shaping_limits.scope_key IS 'The scope as one key (edm.shaping_key); with name, the primary key.';
COMMENT ON COLUMN edm.shaping_limits.name IS 'Name of the limit, unique per scope (e.g. per_hour, per_day); waiting reasons name it.';
COMMENT ON COLUMN edm.shaping_limits.kind IS 'rate, rolling or calendar_day (as edm.service_limits.kind).';
COMMENT ON COLUMN edm.shaping_limits.max_count IS 'Most sends per window (0 blocks the scope).';
COMMENT ON COLUMN edm.shaping_limits.window_ms IS 'Window length in milliseconds (rate and rolling); NULL for calendar_day.';
COMMENT ON COLUMN edm.shaping_limits.burst IS 'rate only: most sends at once (token bucket depth).';
COMMENT ON COLUMN edm.shaping_limits.time_zone IS 'calendar_day only: time zone whose midnight starts a day; NULL = UTC.';
COMMENT ON COLUMN edm.shaping_limits.tat IS 'rate state: GCRA theoretical arrival time (as edm.service_limits.tat).';
COMMENT ON COLUMN edm.shaping_limits.bucket_idx IS 'rolling state: buckets with sends, oldest first (as edm.service_limits.bucket_idx).';
COMMENT ON COLUMN edm.shaping_limits.bucket_n IS 'rolling state: sends slotted in each bucket of bucket_idx.';
COMMENT ON COLUMN edm.shaping_limits.day IS 'calendar_day state: the local date day_count counts.';
COMMENT ON COLUMN edm.shaping_limits.day_count IS 'calendar_day state: sends slotted on day.';
COMMENT ON COLUMN edm.shaping_limits.created_at IS 'When the limit was set.';
CREATE INDEX shaping_limits_scope_idx ON edm.shaping_limits USING btree (scope, service_id);
COMMENT ON INDEX edm.shaping_limits_scope_idx IS 'Limits by scope (is a layer in use; the site limits that apply to a service).';
CREATE INDEX shaping_limits_site_idx ON edm.shaping_limits USING btree (site) WHERE (site IS NOT NULL);
COMMENT ON INDEX edm.shaping_limits_site_idx IS 'The ON UPDATE / DELETE CASCADE from edm.sites.';
CREATE INDEX shaping_limits_task_idx ON edm.shaping_limits USING btree (task_id) WHERE (task_id IS NOT NULL);
COMMENT ON INDEX edm.shaping_limits_task_idx IS 'The ON DELETE CASCADE from edm.tasks.';
CREATE INDEX shaping_limits_user_idx ON edm.shaping_limits USING btree (user_id) WHERE (user_id IS NOT NULL);
COMMENT ON INDEX edm.shaping_limits_user_idx IS 'The ON DELETE CASCADE from edm.users.';

-- ==========================================================================
-- Sites
-- Receiving mailbox providers: the domains that share their throttles, and suspensions of a (service, site).
-- ==========================================================================

CREATE FUNCTION edm.service_site_rules_sync(p_service_ids bigint[])
 RETURNS void
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
BEGIN ATOMIC
 UPDATE edm.services s SET site_rules_until = r.until
    FROM ( SELECT k.service_id,
                 CASE
                     WHEN (EXISTS ( SELECT 1
                        FROM edm.shaping_limits l
                       WHERE ((l.scope = 'service_site'::text) AND (l.service_id = k.service_id)))) THEN 'infinity'::timestamp with time zone
                     ELSE ( SELECT max(x.until) AS max
                        FROM edm.site_suspensions x
                       WHERE (x.service_id = k.service_id))
                 END AS until
            FROM unnest(service_site_rules_sync.p_service_ids) k(service_id)) r
   WHERE ((s.service_id = r.service_id) AND (s.site_rules_until IS DISTINCT FROM r.until));
END;
COMMENT ON FUNCTION edm.service_site_rules_sync(bigint[]) IS 'Recomputes services.site_rules_until of the services p_service_ids from their (service, site) limits and site suspensions (rows left unchanged where it is right already). Called by the triggers of edm.site_suspensions and edm.shaping_limits.';
REVOKE ALL ON FUNCTION edm.service_site_rules_sync(bigint[]) FROM PUBLIC;

CREATE FUNCTION edm.site_suspensions_sync()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_ids bigint[];
BEGIN
  v_ids := ARRAY(SELECT DISTINCT c.service_id FROM changed c);
  -- statement triggers fire for statements that changed no row (a
  -- completion's INSERT ... ON CONFLICT without a throttling reply)
  IF cardinality(v_ids) > 0 THEN
    PERFORM edm.service_site_rules_sync(v_ids);
  END IF;
  RETURN NULL;
END;
$function$;
COMMENT ON FUNCTION edm.site_suspensions_sync() IS 'Statement trigger on edm.site_suspensions: keeps services.site_rules_until of the services whose suspensions changed.';
REVOKE ALL ON FUNCTION edm.site_suspensions_sync() FROM PUBLIC;

CREATE TRIGGER site_suspensions_sync_ins AFTER INSERT ON edm.site_suspensions REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.site_suspensions_sync();
COMMENT ON TRIGGER site_suspensions_sync_ins ON edm.site_suspensions IS 'Moves services.site_rules_until to a new suspension''s end.';

CREATE TRIGGER site_suspensions_sync_upd AFTER UPDATE ON edm.site_suspensions REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.site_suspensions_sync();
COMMENT ON TRIGGER site_suspensions_sync_upd ON edm.site_suspensions IS 'Moves services.site_rules_until when a suspension is extended, renewed or shortened.';

CREATE TRIGGER site_suspensions_sync_del AFTER DELETE ON edm.site_suspensions REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.site_suspensions_sync();
COMMENT ON TRIGGER site_suspensions_sync_del ON edm.site_suspensions IS 'Moves services.site_rules_until back when a suspension is lifted.';

-- ==========================================================================
-- Traffic shaping
-- Limits beyond a service's own — global, per site, per (service, site), per user, per task — held at once by the claim; see docs/explanation/traffic-shaping.md.
-- ==========================================================================

CREATE FUNCTION edm.shaping_as_limit(l edm.shaping_limits)
 RETURNS edm.service_limits
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ROW(COALESCE((l).service_id, (0)::bigint), (l).name, (l).kind, (l).max_count, (l).window_ms, (l).burst, (l).time_zone, (l).tat, (l).bucket_idx, (l).bucket_n, (l).day, (l).day_count, (l).created_at)::edm.service_limits;
COMMENT ON FUNCTION edm.shaping_as_limit(edm.shaping_limits) IS 'Shaping limit l as an edm.service_limits row, so that edm.limit_next and edm.limit_after evaluate it by the same rule as a service''s limits.';
REVOKE ALL ON FUNCTION edm.shaping_as_limit(edm.shaping_limits) FROM PUBLIC;

CREATE FUNCTION edm.shaping_load(p_keys text[], OUT keys text[], OUT lims edm.service_limits[], OUT held text[])
 RETURNS record
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET enable_seqscan TO 'off'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  SELECT array_agg(x.k), array_agg(x.lim) INTO keys, lims
  FROM (SELECT l.scope_key AS k, edm.shaping_as_limit(l) AS lim
        FROM (SELECT DISTINCT k0 FROM unnest(p_keys) k0) pk
        JOIN edm.shaping_limits l ON l.scope_key = pk.k0
        FOR UPDATE OF l SKIP LOCKED) x;
  held := ARRAY(SELECT a.scope_key
                FROM (SELECT DISTINCT k0 FROM unnest(p_keys) k0) pk
                JOIN edm.shaping_limits a ON a.scope_key = pk.k0
                GROUP BY a.scope_key
                HAVING count(*) > coalesce(cardinality(array_positions(keys, a.scope_key)), 0));
END;
$function$;
COMMENT ON FUNCTION edm.shaping_load(text[]) IS 'For the claim: locks the shaping limits of the scopes p_keys without waiting (FOR UPDATE SKIP LOCKED) and returns them as edm.service_limits rows (keys: the scope_key of each) and the scopes with a limit locked by another transaction (held: no headroom for this claim). One primary-key probe per scope.';
REVOKE ALL ON FUNCTION edm.shaping_load(text[]) FROM PUBLIC;

CREATE FUNCTION edm.shaping_next(p_keys text[], p_at timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE
RETURN COALESCE((SELECT max(edm.limit_next(edm.shaping_as_limit(l.*), shaping_next.p_at, 'UTC'::text)) AS max FROM edm.shaping_limits l WHERE (l.scope_key = ANY (shaping_next.p_keys))), p_at);
COMMENT ON FUNCTION edm.shaping_next(text[],timestamp with time zone) IS 'The earliest instant at or after p_at at which every shaping limit of the scopes p_keys (edm.shaping_key) admits one more send.';
REVOKE ALL ON FUNCTION edm.shaping_next(text[],timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.shaping_free(p_keys text[], p_all_keys text[], p_lims edm.service_limits[], p_held text[], p_at timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
  v_at  timestamptz := p_at;
  v_key text;
  i     integer;
BEGIN
  IF p_keys && p_held THEN
    RETURN 'infinity';
  END IF;
  FOREACH v_key IN ARRAY coalesce(p_keys, '{}') LOOP
    FOREACH i IN ARRAY coalesce(array_positions(p_all_keys, v_key), '{}') LOOP
      v_at := greatest(v_at, edm.limit_next(p_lims[i], p_at, 'UTC'));
    END LOOP;
  END LOOP;
  RETURN v_at;
END;
$function$;
COMMENT ON FUNCTION edm.shaping_free(text[],text[],edm.service_limits[],text[],timestamp with time zone) IS 'For the claim: the earliest instant at or after p_at at which every limit of the scopes p_keys admits one more send, from limits read by edm.shaping_load (p_all_keys[i] is the scope of p_lims[i]); infinity when one of the scopes is in p_held (locked by another transaction).';
REVOKE ALL ON FUNCTION edm.shaping_free(text[],text[],edm.service_limits[],text[],timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.shaping_replace(p_scope text, p_site text, p_service_id bigint, p_user_id text, p_task_id bigint, p_limits jsonb)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_key text := edm.shaping_key(p_scope, p_site, p_service_id, p_user_id, p_task_id);
  v_n integer;
BEGIN
  IF p_limits IS NULL OR jsonb_typeof(p_limits) <> 'array' OR jsonb_array_length(p_limits) > 20 THEN
    RAISE EXCEPTION 'limits must be a JSON array of at most 20 limits' USING ERRCODE = 'ED005';
  END IF;
  IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_limits) e
             WHERE jsonb_typeof(e) <> 'object'
                OR NOT (e ?& ARRAY['name', 'kind', 'max_count'])
                OR EXISTS (SELECT 1 FROM jsonb_object_keys(e) k
                           WHERE k NOT IN ('name', 'kind', 'max_count', 'window_ms', 'burst', 'time_zone'))) THEN
    RAISE EXCEPTION 'each limit is an object with name, kind, max_count and optionally window_ms, burst, time_zone'
      USING ERRCODE = 'ED005';
  END IF;
  IF (SELECT count(DISTINCT e->>'name') FROM jsonb_array_elements(p_limits) e)
     <> jsonb_array_length(p_limits) THEN
    RAISE EXCEPTION 'limit names must be unique per scope' USING ERRCODE = 'ED005';
  END IF;
  BEGIN
    -- A limit whose max_count alone changes keeps its state (0022): the
    -- sends it counted still count.
    UPDATE edm.shaping_limits l SET max_count = (e->>'max_count')::integer
    FROM jsonb_array_elements(p_limits) e
    WHERE l.scope_key = v_key
      AND e->>'name' = l.name AND e->>'kind' = l.kind
      AND (e->>'max_count')::integer <> l.max_count
      AND (e->>'window_ms')::bigint IS NOT DISTINCT FROM l.window_ms
      AND coalesce((e->>'burst')::integer, 1) = l.burst
      AND (e->>'time_zone') IS NOT DISTINCT FROM l.time_zone;
    DELETE FROM edm.shaping_limits l
    WHERE l.scope_key = v_key
      AND NOT EXISTS (
        SELECT 1 FROM jsonb_array_elements(p_limits) e
        WHERE e->>'name' = l.name AND e->>'kind' = l.kind
          AND (e->>'max_count')::integer = l.max_count
          AND (e->>'window_ms')::bigint IS NOT DISTINCT FROM l.window_ms
          AND coalesce((e->>'burst')::integer, 1) = l.burst
          AND (e->>'time_zone') IS NOT DISTINCT FROM l.time_zone);
    INSERT INTO edm.shaping_limits (scope, site, service_id, user_id, task_id, name, kind,
                                    max_count, window_ms, burst, time_zone)
    SELECT p_scope, p_site, p_service_id, p_user_id, p_task_id, e->>'name', e->>'kind',
           (e->>'max_count')::integer, (e->>'window_ms')::bigint,
           coalesce((e->>'burst')::integer, 1), e->>'time_zone'
    FROM jsonb_array_elements(p_limits) e
    ON CONFLICT (scope_key, name) DO NOTHING;
  EXCEPTION
    WHEN check_violation OR not_null_violation OR invalid_text_representation
         OR numeric_value_out_of_range OR cardinality_violation THEN
      RAISE EXCEPTION 'invalid limit: %', SQLERRM USING ERRCODE = 'ED005';
  END;
  PERFORM pg_notify('edm_wakeup', 'shaping:' || p_scope);
  SELECT count(*) INTO v_n FROM edm.shaping_limits l WHERE l.scope_key = v_key;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.shaping_replace(text,text,bigint,text,bigint,jsonb) IS 'Replaces the shaping limits of one scope with p_limits, a JSON array of {name, kind, max_count, window_ms, burst, time_zone} as edm.set_service_limits takes; an unchanged limit keeps its state, and so does one whose max_count alone changes. Raises ED005 for a bad limit (nothing is changed). Called by the edm.set_*_limits functions, which check the scope''s target.';
REVOKE ALL ON FUNCTION edm.shaping_replace(text,text,bigint,text,bigint,jsonb) FROM PUBLIC;

CREATE FUNCTION edm.shaping_limits_flag()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  UPDATE edm.users u
  SET has_limits = EXISTS (SELECT 1 FROM edm.shaping_limits l
                           WHERE l.scope = 'user' AND l.user_id = u.user_id)
  WHERE u.user_id IN (SELECT x.user_id FROM changed x WHERE x.scope = 'user');
  UPDATE edm.tasks t
  SET has_limits = EXISTS (SELECT 1 FROM edm.shaping_limits l
                           WHERE l.scope = 'task' AND l.task_id = t.task_id)
  WHERE t.task_id IN (SELECT x.task_id FROM changed x WHERE x.scope = 'task');
  PERFORM edm.service_site_rules_sync(ARRAY(SELECT DISTINCT x.service_id FROM changed x
                                             WHERE x.scope = 'service_site'));
  RETURN NULL;
END;
$function$;
COMMENT ON FUNCTION edm.shaping_limits_flag() IS 'Statement trigger on edm.shaping_limits: keeps users.has_limits, tasks.has_limits and services.site_rules_until in step, so the claim reads user, task and (service, site) limits only where there are some.';
REVOKE ALL ON FUNCTION edm.shaping_limits_flag() FROM PUBLIC;

CREATE FUNCTION edm.service_free_for_tier(s edm.services, p_horizon timestamp with time zone, p_now timestamp with time zone, p_taken bigint[])
 RETURNS boolean
 LANGUAGE sql
 STABLE
RETURN ((s).enabled AND ((s).next_available_at <= p_horizon) AND (edm.service_sent_today(s, p_now) < (s).daily_quota) AND (((s).service_id <> ALL (p_taken)) OR (((s).interval_ms = 0) AND ((edm.service_sent_today(s, p_now) + 1) < (s).daily_quota))));
COMMENT ON FUNCTION edm.service_free_for_tier(edm.services,timestamp with time zone,timestamp with time zone,bigint[]) IS 'True when service s can take a send by p_horizon (enabled, next slot due, under its daily quota at p_now) and is not busy in this claim (p_taken: services claimed already, unless s has no interval and quota left for one more). A user with such a service on a higher-priority grant is left to it (grant tiers). Inlined by the planner.';
REVOKE ALL ON FUNCTION edm.service_free_for_tier(edm.services,timestamp with time zone,timestamp with time zone,bigint[]) FROM PUBLIC;

CREATE FUNCTION edm.set_global_limits(p_limits jsonb)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  RETURN edm.shaping_replace('global', NULL, NULL, NULL, NULL, p_limits);
END;
$function$;
COMMENT ON FUNCTION edm.set_global_limits(jsonb) IS 'Replaces the global limits (every send of every service) with p_limits (the JSON form of edm.set_service_limits; [] removes them). Returns how many are set. ED005 for a bad limit.';
REVOKE ALL ON FUNCTION edm.set_global_limits(jsonb) FROM PUBLIC;

CREATE FUNCTION edm.set_site_limits(p_site text, p_limits jsonb, p_service_id bigint DEFAULT NULL::bigint)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  IF p_site IS NULL THEN
    RAISE EXCEPTION 'set_site_limits: a site is required' USING ERRCODE = 'ED005';
  END IF;
  PERFORM 1 FROM edm.sites s WHERE s.site = p_site;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown site %', p_site USING ERRCODE = 'ED001';
  END IF;
  IF p_service_id IS NULL THEN
    RETURN edm.shaping_replace('site', p_site, NULL, NULL, NULL, p_limits);
  END IF;
  PERFORM 1 FROM edm.services s WHERE s.service_id = p_service_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  RETURN edm.shaping_replace('service_site', p_site, p_service_id, NULL, NULL, p_limits);
END;
$function$;
COMMENT ON FUNCTION edm.set_site_limits(text,jsonb,bigint) IS 'Replaces the limits of site p_site across all services (p_service_id NULL), or of service p_service_id to that site, with p_limits (the JSON form of edm.set_service_limits; [] removes them). Returns how many are set. ED001 for an unknown site or service, ED005 for a bad limit.';
REVOKE ALL ON FUNCTION edm.set_site_limits(text,jsonb,bigint) FROM PUBLIC;

CREATE FUNCTION edm.set_user_limits(p_user_id text, p_limits jsonb)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  -- the claim reads and advances user limits under the user row lock
  PERFORM 1 FROM edm.users u WHERE u.user_id = p_user_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown user %', p_user_id USING ERRCODE = 'ED001';
  END IF;
  RETURN edm.shaping_replace('user', NULL, NULL, p_user_id, NULL, p_limits);
END;
$function$;
COMMENT ON FUNCTION edm.set_user_limits(text,jsonb) IS 'Replaces the limits of user p_user_id (a tenant''s plan: per hour, per day...) with p_limits (the JSON form of edm.set_service_limits; [] removes them). Returns how many are set. ED001 for an unknown user, ED005 for a bad limit.';
REVOKE ALL ON FUNCTION edm.set_user_limits(text,jsonb) FROM PUBLIC;

CREATE FUNCTION edm.set_task_limits(p_task_id bigint, p_limits jsonb)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  -- the claim reads and advances task limits under the task row lock
  PERFORM 1 FROM edm.tasks t WHERE t.task_id = p_task_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'ED001';
  END IF;
  RETURN edm.shaping_replace('task', NULL, NULL, NULL, p_task_id, p_limits);
END;
$function$;
COMMENT ON FUNCTION edm.set_task_limits(bigint,jsonb) IS 'Replaces the limits of task p_task_id (a campaign''s maximum rate) with p_limits (the JSON form of edm.set_service_limits; [] removes them). Returns how many are set. ED001 for an unknown task, ED005 for a bad limit.';
REVOKE ALL ON FUNCTION edm.set_task_limits(bigint,jsonb) FROM PUBLIC;

CREATE FUNCTION edm.set_task_transactional(p_task_id bigint, p_transactional boolean)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_status text;
BEGIN
  IF p_transactional IS NULL THEN
    RAISE EXCEPTION 'set_task_transactional: true or false is required' USING ERRCODE = 'ED005';
  END IF;
  SELECT t.status INTO v_status FROM edm.tasks t WHERE t.task_id = p_task_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'ED001';
  END IF;
  IF v_status IN ('completed', 'cancelled', 'failed') THEN
    RAISE EXCEPTION 'task % is finished (%)', p_task_id, v_status USING ERRCODE = 'ED003';
  END IF;
  UPDATE edm.tasks t SET transactional = p_transactional, updated_at = now()
  WHERE t.task_id = p_task_id AND t.transactional IS DISTINCT FROM p_transactional;
  RETURN p_transactional;
END;
$function$;
COMMENT ON FUNCTION edm.set_task_transactional(bigint,boolean) IS 'Puts task p_task_id in the transactional lane (true) or back in the bulk lane (false). ED001 for an unknown task, ED003 for a finished one.';
REVOKE ALL ON FUNCTION edm.set_task_transactional(bigint,boolean) FROM PUBLIC;

CREATE FUNCTION edm.task_site_wait(p_task_id bigint, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(reason text, until timestamp with time zone)
 LANGUAGE sql
 STABLE
BEGIN ATOMIC
 WITH next_sites AS (
          SELECT DISTINCT edm.site_of(st.email) AS site
            FROM ( SELECT s0.email
                    FROM edm.subtasks s0
                   WHERE ((s0.task_id = task_site_wait.p_task_id) AND (s0.status = 'pending'::text))
                   ORDER BY s0.not_before, s0.subtask_id
                  LIMIT 1000) st
         ), services AS (
          SELECT s.service_id
            FROM ((edm.tasks t
              JOIN edm.grants g ON ((g.user_id = t.user_id)))
              JOIN edm.services s ON ((s.service_id = g.service_id)))
           WHERE ((t.task_id = task_site_wait.p_task_id) AND s.enabled)
         ), held AS (
          SELECT n.site,
             v.service_id,
             ( SELECT max(x.until) AS max
                    FROM edm.site_suspensions x
                   WHERE ((x.service_id = v.service_id) AND (x.site = n.site) AND (x.until > COALESCE(task_site_wait.p_now, now())))) AS suspended_until,
             ( SELECT max(edm.limit_next(edm.shaping_as_limit(l.*), COALESCE(task_site_wait.p_now, now()), 'UTC'::text)) AS max
                    FROM edm.shaping_limits l
                   WHERE (l.scope_key = ANY (ARRAY[edm.shaping_key('site'::text, n.site, NULL::bigint, NULL::text, NULL::bigint), edm.shaping_key('service_site'::text, n.site, v.service_id, NULL::text, NULL::bigint)]))) AS limit_free
            FROM (next_sites n
              CROSS JOIN services v)
           WHERE (n.site IS NOT NULL)
         ), per_site AS (
          SELECT h.site,
             min(GREATEST(h.suspended_until, NULLIF(h.limit_free, COALESCE(task_site_wait.p_now, now())))) AS free,
             bool_or((h.suspended_until IS NOT NULL)) AS suspended,
             bool_or((h.limit_free > COALESCE(task_site_wait.p_now, now()))) AS limited,
             bool_and((GREATEST(h.suspended_until, NULLIF(h.limit_free, COALESCE(task_site_wait.p_now, now()))) IS NOT NULL)) AS held
            FROM held h
           GROUP BY h.site
         )
  SELECT ('sites held back: '::text || string_agg(format('%s %s until %s'::text, p.site,
         CASE
             WHEN (p.suspended AND p.limited) THEN 'suspended and limited'::text
             WHEN p.suspended THEN 'suspended'::text
             ELSE 'limited'::text
         END,
         CASE
             WHEN (p.free = 'infinity'::timestamp with time zone) THEN 'raised'::text
             ELSE (p.free)::text
         END), '; '::text ORDER BY p.free, p.site)) AS reason,
     NULLIF(min(p.free), 'infinity'::timestamp with time zone) AS until
    FROM per_site p
  HAVING ((count(*) > 0) AND bool_and(p.held) AND (count(*) = ( SELECT count(*) AS count
            FROM next_sites n2)) AND (( SELECT count(*) AS count
            FROM services) > 0));
END;
COMMENT ON FUNCTION edm.task_site_wait(bigint,timestamp with time zone) IS 'Why the sites of task p_task_id''s next recipients (the first 1000 pending, in claim order) hold it back at p_now: a row only when every one of them has a site that is suspended (edm.site_suspensions) or without headroom (site and service_site limits of edm.shaping_limits) on every enabled granted service, listing each site with when it frees; until is the first of them. No row when some recipient can go.';
REVOKE ALL ON FUNCTION edm.task_site_wait(bigint,timestamp with time zone) FROM PUBLIC;

CREATE VIEW edm.shaping_limit_status AS
 SELECT scope,
    site,
    service_id,
    user_id,
    task_id,
    limit_name,
    kind,
    max_count,
    window_ms,
    burst,
    used,
    GREATEST((max_count - used), 0) AS headroom,
    next_free_at
   FROM ( SELECT l.scope,
            l.site,
            l.service_id,
            l.user_id,
            l.task_id,
            l.name AS limit_name,
            l.kind,
            l.max_count,
            l.window_ms,
            l.burst,
                CASE l.kind
                    WHEN 'calendar_day'::text THEN
                    CASE
                        WHEN (l.day = ((now() AT TIME ZONE COALESCE(l.time_zone, 'UTC'::text)))::date) THEN l.day_count
                        ELSE 0
                    END
                    WHEN 'rolling'::text THEN ( SELECT (COALESCE(sum(b.n), (0)::bigint))::integer AS "coalesce"
                       FROM UNNEST(l.bucket_idx, l.bucket_n) b(i, n)
                      WHERE ((b.i)::numeric >= (((edm.epoch_ms(now()) / edm.limit_bucket_ms(l.window_ms)))::numeric - ceil(((l.window_ms)::numeric / (edm.limit_bucket_ms(l.window_ms))::numeric)))))
                    ELSE LEAST(l.burst, (GREATEST((0)::numeric, ceil(((EXTRACT(epoch FROM (COALESCE(l.tat, now()) - now())) * (1000)::numeric) / ((l.window_ms)::numeric / (GREATEST(l.max_count, 1))::numeric)))))::integer)
                END AS used,
            NULLIF(edm.limit_next(edm.shaping_as_limit(l.*), now(), 'UTC'::text), now()) AS next_free_at
           FROM edm.shaping_limits l) x;
COMMENT ON VIEW edm.shaping_limit_status IS 'Every shaping limit (edm.shaping_limits: global, site, service_site, user, task) with its use, headroom and when it next admits a send (NULL: now).';
COMMENT ON COLUMN edm.shaping_limit_status.scope IS 'global, site, service_site, user or task.';
COMMENT ON COLUMN edm.shaping_limit_status.site IS 'Site (site and service_site scopes).';
COMMENT ON COLUMN edm.shaping_limit_status.service_id IS 'Service (service_site scope).';
COMMENT ON COLUMN edm.shaping_limit_status.user_id IS 'User (user scope).';
COMMENT ON COLUMN edm.shaping_limit_status.task_id IS 'Task (task scope).';
COMMENT ON COLUMN edm.shaping_limit_status.limit_name IS 'Name of the limit.';
COMMENT ON COLUMN edm.shaping_limit_status.kind IS 'rate, rolling or calendar_day.';
COMMENT ON COLUMN edm.shaping_limit_status.max_count IS 'Most sends per window.';
COMMENT ON COLUMN edm.shaping_limit_status.window_ms IS 'Window in milliseconds (NULL for a calendar day).';
COMMENT ON COLUMN edm.shaping_limit_status.burst IS 'Most sends at once (rate limits).';
COMMENT ON COLUMN edm.shaping_limit_status.used IS 'Sends counted in the current window (rate: in the token bucket).';
COMMENT ON COLUMN edm.shaping_limit_status.headroom IS 'max_count - used, at least 0.';
COMMENT ON COLUMN edm.shaping_limit_status.next_free_at IS 'When the limit next admits a send; NULL when it does now (infinity: max_count 0).';

CREATE TRIGGER shaping_limits_flag_ins AFTER INSERT ON edm.shaping_limits REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.shaping_limits_flag();
COMMENT ON TRIGGER shaping_limits_flag_ins ON edm.shaping_limits IS 'Sets users.has_limits / tasks.has_limits for new user and task limits.';

CREATE TRIGGER shaping_limits_flag_del AFTER DELETE ON edm.shaping_limits REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION edm.shaping_limits_flag();
COMMENT ON TRIGGER shaping_limits_flag_del ON edm.shaping_limits IS 'Clears users.has_limits / tasks.has_limits when their last limit goes.';

-- ==========================================================================
-- Reply rules
-- Patterns on a provider's answers and the actions they trigger (suspend, bounce, retry); what a DBA reads of each site's state.
-- ==========================================================================

CREATE FUNCTION edm.reply_pattern_ok(p_pattern text)
 RETURNS boolean
 LANGUAGE plpgsql
 IMMUTABLE
AS $function$
BEGIN
  IF p_pattern IS NULL THEN
    RETURN true;
  END IF;
  PERFORM '' ~* p_pattern;
  RETURN true;
EXCEPTION WHEN invalid_regular_expression THEN
  RETURN false;
END;
$function$;
COMMENT ON FUNCTION edm.reply_pattern_ok(text) IS 'True when p_pattern (or NULL) is a valid PostgreSQL regular expression: a rule with a broken pattern would make every completion fail.';
REVOKE ALL ON FUNCTION edm.reply_pattern_ok(text) FROM PUBLIC;

CREATE TABLE edm.reply_rules (
  rule_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  name text NOT NULL,
  priority integer DEFAULT 100 NOT NULL,
  enabled boolean DEFAULT true NOT NULL,
  source text DEFAULT 'admin'::text NOT NULL,
  site text,
  smtp_code integer,
  enhanced_code text,
  pattern text,
  transport_code text,
  action text NOT NULL,
  duration_s integer,
  escalation_factor double precision DEFAULT 1 NOT NULL,
  max_duration_s integer,
  reset_after_s integer DEFAULT 3600 NOT NULL,
  description text DEFAULT ''::text NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT reply_rules_pkey PRIMARY KEY (rule_id),
  CONSTRAINT reply_rules_name_key UNIQUE (name),
  CONSTRAINT reply_rules_site_fkey FOREIGN KEY (site) REFERENCES edm.sites(site) ON UPDATE CASCADE ON DELETE CASCADE,
  CONSTRAINT reply_rules_action_check CHECK ((action = ANY (ARRAY['suspend_site'::text, 'suspend_service'::text, 'bounce'::text, 'retry'::text]))),
  CONSTRAINT reply_rules_description_check CHECK ((length(description) <= 500)),
  CONSTRAINT reply_rules_duration CHECK (((action = 'bounce'::text) = (duration_s IS NULL))),
  CONSTRAINT reply_rules_duration_s_check CHECK (((duration_s >= 1) AND (duration_s <= 2592000))),
  CONSTRAINT reply_rules_enhanced_code_check CHECK ((enhanced_code ~ '^[245]\.([0-9]{1,3}\.([0-9]{1,3})?)?$'::text)),
  CONSTRAINT reply_rules_escalation_factor_check CHECK (((escalation_factor >= (1)::double precision) AND (escalation_factor <= (100)::double precision))),
  CONSTRAINT reply_rules_matches_something CHECK (((smtp_code IS NOT NULL) OR (enhanced_code IS NOT NULL) OR (pattern IS NOT NULL) OR (transport_code IS NOT NULL))),
  CONSTRAINT reply_rules_max_duration CHECK (((max_duration_s IS NULL) OR ((duration_s IS NOT NULL) AND (max_duration_s >= duration_s)))),
  CONSTRAINT reply_rules_max_duration_s_check CHECK (((max_duration_s >= 1) AND (max_duration_s <= 2592000))),
  CONSTRAINT reply_rules_name_check CHECK ((name ~ '^[a-z0-9][a-z0-9_.:-]{0,99}$'::text)),
  CONSTRAINT reply_rules_pattern_check CHECK ((((length(pattern) >= 1) AND (length(pattern) <= 500)) AND edm.reply_pattern_ok(pattern))),
  CONSTRAINT reply_rules_priority_check CHECK (((priority >= 0) AND (priority <= 1000000))),
  CONSTRAINT reply_rules_reset_after_s_check CHECK (((reset_after_s >= 0) AND (reset_after_s <= 2592000))),
  CONSTRAINT reply_rules_smtp_code_check CHECK (((smtp_code >= 200) AND (smtp_code <= 599))),
  CONSTRAINT reply_rules_source_check CHECK ((source = ANY (ARRAY['shipped'::text, 'admin'::text]))),
  CONSTRAINT reply_rules_transport_code_check CHECK ((transport_code ~ '^[a-z0-9_-]{1,20}:[a-z0-9_.-]{1,80}$'::text))
);
COMMENT ON TABLE edm.reply_rules IS 'Rules on a provider''s reply to a failed send, tried by edm.complete in (priority, rule_id) order; the first enabled rule whose every given criterion matches decides what the failure means: suspend the (service, site) pair, back the service off, bounce, or retry the recipient later. shipped rows are defaults of edm-sched for the large providers (edit, disable or delete them freely). See docs/explanation/traffic-shaping.md.';
COMMENT ON COLUMN edm.reply_rules.rule_id IS 'Identity of the rule.';
COMMENT ON COLUMN edm.reply_rules.name IS 'Unique name (a-z 0-9 _ . : -), the key of edm.set_reply_rule.';
COMMENT ON COLUMN edm.reply_rules.priority IS 'Lower is tried first (ties: lower rule_id).';
COMMENT ON COLUMN edm.reply_rules.enabled IS 'Disabled rules are kept but never match.';
COMMENT ON COLUMN edm.reply_rules.source IS 'shipped (a default of edm-sched, as shipped) or admin (written or edited by the host or a DBA).';
COMMENT ON COLUMN edm.reply_rules.site IS 'Only for recipients of this site (NULL: any recipient).';
COMMENT ON COLUMN edm.reply_rules.smtp_code IS 'The SMTP reply code must be this (NULL: any).';
COMMENT ON COLUMN edm.reply_rules.enhanced_code IS 'The enhanced status code in the reply must be this (4.7.28), or start with it when it ends with a dot (4.7. matches 4.7.0 and 4.7.650; 4. matches every persistent transient code). NULL: any.';
COMMENT ON COLUMN edm.reply_rules.pattern IS 'Case-insensitive regular expression the reply text must match (NULL: any). The text is what the transport reported, e.g. "RCPT TO: 421 4.7.28 ..." for SMTP.';
COMMENT ON COLUMN edm.reply_rules.transport_code IS 'A non-SMTP transport''s error code the reply must carry, kind:code in lower case (http:429, ses:throttling); NULL: any.';
COMMENT ON COLUMN edm.reply_rules.action IS 'suspend_site (pause the service for the recipient''s site, escalating), suspend_service (back the service off), bounce (fail the subtask for good) or retry (retry the recipient after duration_s).';
COMMENT ON COLUMN edm.reply_rules.duration_s IS 'Seconds of the suspension, back-off or retry delay (the first one for suspend_site); NULL for bounce.';
COMMENT ON COLUMN edm.reply_rules.escalation_factor IS 'suspend_site: each repeat within reset_after_s of the previous suspension''s end lasts this many times longer (1: no escalation).';
COMMENT ON COLUMN edm.reply_rules.max_duration_s IS 'suspend_site: longest escalated suspension in seconds (NULL: duration_s, no escalation).';
COMMENT ON COLUMN edm.reply_rules.reset_after_s IS 'suspend_site: a pair calm for this many seconds after its last suspension ended starts again at level 1.';
COMMENT ON COLUMN edm.reply_rules.description IS 'Free text: which reply of which provider this is, and where it is documented.';
COMMENT ON COLUMN edm.reply_rules.updated_at IS 'When the rule was last written.';
CREATE INDEX reply_rules_order_idx ON edm.reply_rules USING btree (priority, rule_id) WHERE enabled;
COMMENT ON INDEX edm.reply_rules_order_idx IS 'Enabled rules in the order they are tried.';
INSERT INTO edm.reply_rules (rule_id, name, priority, enabled, source, site, smtp_code, enhanced_code, pattern, transport_code, action, duration_s, escalation_factor, max_duration_s, reset_after_s, description) OVERRIDING SYSTEM VALUE VALUES
  ('1', 'gmail-4.7.28-rate', '10', 'true', 'shipped', NULL, NULL, '4.7.28', NULL, NULL, 'suspend_site', '900', '2', '14400', '21600', 'Gmail 421 4.7.28: unusual rate of unsolicited mail from the sending IP or domain; slow down.'),
  ('10', 'microsoft-5.7.6xx-banned-ip', '5', 'true', 'shipped', NULL, '550', NULL, E'\\m5\\.7\\.6(0[6-9]|[1-4][0-9])\\M', NULL, 'suspend_service', '21600', '1', NULL, '3600', 'Microsoft 550 5.7.606-649: access denied, banned sending IP; the account must stop until delisted (no recipient is suppressed).'),
  ('11', 'yahoo-tss-deferred', '10', 'true', 'shipped', NULL, NULL, NULL, E'\\[(TSS0[1-9]|TS0[1-3])\\]', NULL, 'suspend_site', '3600', '2', '28800', '43200', 'Yahoo/AOL 421 4.7.0 [TSS04], [TSS09], [TS01]...: temporarily deferred due to unexpected volume or user complaints (Yahoo suggests retrying hours later).'),
  ('12', 'aol-dyn-rly-deferred', '14', 'true', 'shipped', NULL, '421', NULL, E'\\((DYN|RLY):T[12]\\)', NULL, 'suspend_site', '3600', '2', '28800', '43200', 'AOL 421 (DYN:T1) / (RLY:T1): the sending IP is temporarily deferred.'),
  ('13', 'apple-excessive-volume', '10', 'true', 'shipped', NULL, NULL, NULL, 'deferred due to excessive volume', NULL, 'suspend_site', '900', '2', '14400', '21600', 'Apple iCloud 421 4.7.1: messages deferred due to excessive volume; try again later.'),
  ('14', 'apple-service-unavailable', '15', 'true', 'shipped', 'apple', '451', '4.7.1', 'service unavailable', NULL, 'suspend_site', '300', '2', '3600', '7200', 'Apple iCloud 451 4.7.1: service unavailable, try again later (busy hours).'),
  ('15', 'comcast-throttled', '15', 'true', 'shipped', 'comcast', '421', NULL, '(throttl|rate limit|too many)', NULL, 'suspend_site', '900', '2', '14400', '21600', 'Comcast 421 throttling replies (rate or connection limits of the sending IP).'),
  ('16', 'ses-daily-quota', '5', 'true', 'shipped', NULL, NULL, NULL, 'daily message quota exceeded', NULL, 'suspend_service', '3600', '1', NULL, '3600', 'Amazon SES "Daily message quota exceeded": the account''s 24-hour quota is used up.'),
  ('17', 'ses-max-send-rate', '6', 'true', 'shipped', NULL, NULL, NULL, 'maximum sending rate exceeded', NULL, 'suspend_service', '10', '1', NULL, '3600', 'Amazon SES "Throttling: Maximum sending rate exceeded": pause the account briefly.'),
  ('18', 'ses-throttling', '50', 'true', 'shipped', NULL, NULL, NULL, NULL, 'ses:throttling', 'suspend_service', '10', '1', NULL, '3600', 'Any other Amazon SES Throttling error: pause the account briefly.'),
  ('19', 'http-429', '50', 'true', 'shipped', NULL, NULL, NULL, NULL, 'http:429', 'suspend_service', '60', '1', NULL, '3600', 'An ESP HTTP API answered 429 Too Many Requests: pause the account briefly.'),
  ('2', 'gmail-5.7.28-rate', '11', 'true', 'shipped', NULL, NULL, '5.7.28', NULL, NULL, 'suspend_site', '3600', '2', '86400', '86400', 'Gmail 550 5.7.28: unusual rate of unsolicited mail, refused; a send-side block, not a bad address (no suppression).'),
  ('3', 'gmail-4.7.0-rate', '20', 'true', 'shipped', NULL, NULL, '4.7.0', '(rate[- ]?limit|unusual rate|too many|temporarily (deferred|rate))', NULL, 'suspend_site', '600', '2', '14400', '21600', '421/451 4.7.0 replies that say the sender goes too fast (Gmail and others).'),
  ('4', 'gmail-4.7.0-reputation', '21', 'true', 'shipped', NULL, NULL, '4.7.0', 'low reputation', NULL, 'suspend_site', '3600', '2', '43200', '86400', 'Gmail 421 4.7.0: suspicious due to the very low reputation of the sending IP or domain.'),
  ('5', 'gmail-4.2.1-recipient-rate', '30', 'true', 'shipped', NULL, NULL, '4.2.1', 'receiving mail (too quickly|at a rate)', NULL, 'retry', '1800', '1', NULL, '3600', 'Gmail 450 4.2.1: this one recipient receives mail too fast; retry it later, the site is fine.'),
  ('6', 'microsoft-4.7.650-rate', '10', 'true', 'shipped', NULL, NULL, '4.7.650', NULL, NULL, 'suspend_site', '1800', '2', '28800', '43200', 'Microsoft 451 4.7.650: the mail server has been temporarily rate limited due to IP reputation.'),
  ('7', 'microsoft-4.7.651-rate', '10', 'true', 'shipped', NULL, NULL, '4.7.651', NULL, NULL, 'suspend_site', '1800', '2', '28800', '43200', 'Microsoft 451 4.7.651: temporarily rate limited due to IP reputation.'),
  ('8', 'microsoft-4.7.500-busy', '12', 'true', 'shipped', NULL, NULL, '4.7.500', NULL, NULL, 'suspend_site', '300', '2', '3600', '7200', 'Microsoft 451 4.7.500: server busy, please try again later.'),
  ('9', 'microsoft-rp-rate', '13', 'true', 'shipped', NULL, '421', NULL, E'\\mRP-00[1-3]\\M', NULL, 'suspend_site', '900', '2', '14400', '21600', 'Microsoft 421 RP-001/002/003: the sending IP exceeded a rate or connection limit tied to its reputation.');

CREATE TABLE edm.shaping_actions (
  action_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  at timestamp with time zone NOT NULL,
  rule_id bigint,
  rule_name text NOT NULL,
  service_id bigint NOT NULL,
  site text,
  subtask_id bigint,
  action text NOT NULL,
  until timestamp with time zone,
  level integer,
  code integer,
  reply text,
  CONSTRAINT shaping_actions_pkey PRIMARY KEY (action_id),
  CONSTRAINT shaping_actions_rule_id_fkey FOREIGN KEY (rule_id) REFERENCES edm.reply_rules(rule_id) ON DELETE SET NULL,
  CONSTRAINT shaping_actions_service_id_fkey FOREIGN KEY (service_id) REFERENCES edm.services(service_id) ON DELETE CASCADE,
  CONSTRAINT shaping_actions_action_check CHECK ((action = ANY (ARRAY['suspend_site'::text, 'suspend_service'::text, 'bounce'::text, 'retry'::text]))),
  CONSTRAINT shaping_actions_reply_check CHECK ((length(reply) <= 2000))
);
COMMENT ON TABLE edm.shaping_actions IS 'Log of every reply rule applied by edm.complete: one row per completed subtask a rule matched, with the reply that caused it and what it set until when. Suspensions and back-offs end by themselves at until; rows are trimmed by edm.trim_shaping_actions by the sweeps after retention.shaping_action_days.';
COMMENT ON COLUMN edm.shaping_actions.action_id IS 'Identity of the log row.';
COMMENT ON COLUMN edm.shaping_actions.at IS 'When the completion applied the rule (its p_now).';
COMMENT ON COLUMN edm.shaping_actions.rule_id IS 'Rule applied (NULL once the rule was deleted).';
COMMENT ON COLUMN edm.shaping_actions.rule_name IS 'Name of the rule when it was applied.';
COMMENT ON COLUMN edm.shaping_actions.service_id IS 'Service that received the reply.';
COMMENT ON COLUMN edm.shaping_actions.site IS 'Site of the recipient (NULL: its domain is not mapped).';
COMMENT ON COLUMN edm.shaping_actions.subtask_id IS 'Subtask whose send got the reply.';
COMMENT ON COLUMN edm.shaping_actions.action IS 'Action of the rule: suspend_site, suspend_service, bounce or retry.';
COMMENT ON COLUMN edm.shaping_actions.until IS 'End of what the action set: the pair''s suspension, the service''s back-off, or the recipient''s retry (NULL for bounce).';
COMMENT ON COLUMN edm.shaping_actions.level IS 'suspend_site: escalation level of the pair''s suspension.';
COMMENT ON COLUMN edm.shaping_actions.code IS 'SMTP reply code reported with the reply (NULL for other transports).';
COMMENT ON COLUMN edm.shaping_actions.reply IS 'The reply text as reported by the transport.';
CREATE INDEX shaping_actions_at_idx ON edm.shaping_actions USING btree (at);
COMMENT ON INDEX edm.shaping_actions_at_idx IS 'Trimming old rows (edm.trim_shaping_actions).';
CREATE INDEX shaping_actions_pair_idx ON edm.shaping_actions USING btree (service_id, site, at DESC);
COMMENT ON INDEX edm.shaping_actions_pair_idx IS 'Latest actions of a (service, site) pair (edm.site_suspension_status).';

CREATE FUNCTION edm.reply_transport_code(p_detail text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN lower("substring"(p_detail, '^\[([A-Za-z0-9_-]{1,20}:[A-Za-z0-9_.-]{1,80})\]'::text));
COMMENT ON FUNCTION edm.reply_transport_code(text) IS 'A non-SMTP transport''s error code at the start of a reply text, in brackets ("[http:429] Too Many Requests", "[ses:Throttling] Maximum sending rate exceeded"), lower case; NULL when there is none.';
REVOKE ALL ON FUNCTION edm.reply_transport_code(text) FROM PUBLIC;

CREATE FUNCTION edm.reply_enhanced_code(p_detail text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN "substring"(p_detail, '(?:^|[^0-9.])([245]\.[0-9]{1,3}\.[0-9]{1,3})(?:[^0-9.]|\.(?![0-9])|$)'::text);
COMMENT ON FUNCTION edm.reply_enhanced_code(text) IS 'The first RFC 3463 enhanced status code (class.subject.detail, e.g. 4.7.28) standing alone in a reply text, or NULL. The SMTP transport reports replies as "<command>: <code> <enhanced code> <text>".';
REVOKE ALL ON FUNCTION edm.reply_enhanced_code(text) FROM PUBLIC;

CREATE FUNCTION edm.match_reply_rule(p_code integer, p_detail text, p_site text DEFAULT NULL::text, p_any_site boolean DEFAULT false)
 RETURNS bigint
 LANGUAGE sql
 STABLE
BEGIN ATOMIC
 SELECT r.rule_id
    FROM (edm.reply_rules r
      CROSS JOIN LATERAL ( SELECT edm.reply_enhanced_code(match_reply_rule.p_detail) AS enh,
             edm.reply_transport_code(match_reply_rule.p_detail) AS tcode) x)
   WHERE (r.enabled AND ((r.site IS NULL) OR (r.site = match_reply_rule.p_site) OR match_reply_rule.p_any_site) AND ((r.smtp_code IS NULL) OR (r.smtp_code = match_reply_rule.p_code)) AND ((r.enhanced_code IS NULL) OR
         CASE
             WHEN ("right"(r.enhanced_code, 1) = '.'::text) THEN starts_with(x.enh, r.enhanced_code)
             ELSE (x.enh = r.enhanced_code)
         END) AND ((r.transport_code IS NULL) OR (x.tcode = r.transport_code)) AND ((r.pattern IS NULL) OR (match_reply_rule.p_detail ~* r.pattern)))
   ORDER BY r.priority, r.rule_id
  LIMIT 1;
END;
COMMENT ON FUNCTION edm.match_reply_rule(integer,text,text,boolean) IS 'The first enabled reply rule (by priority, then rule_id) matching a reply: SMTP code p_code, reply text p_detail (its enhanced code and transport code are read from it), for a recipient of site p_site (p_any_site: whatever the rule''s site); NULL when none does. What edm.complete applies, callable to test a rule.';
REVOKE ALL ON FUNCTION edm.match_reply_rule(integer,text,text,boolean) FROM PUBLIC;

CREATE FUNCTION edm.set_reply_rule(p_name text, p_action text, p_smtp_code integer DEFAULT NULL::integer, p_enhanced_code text DEFAULT NULL::text, p_pattern text DEFAULT NULL::text, p_transport_code text DEFAULT NULL::text, p_site text DEFAULT NULL::text, p_priority integer DEFAULT 100, p_duration_s integer DEFAULT NULL::integer, p_escalation_factor double precision DEFAULT 1, p_max_duration_s integer DEFAULT NULL::integer, p_reset_after_s integer DEFAULT 3600, p_enabled boolean DEFAULT true, p_description text DEFAULT ''::text)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_id bigint;
  v_tcode text := lower(p_transport_code);
BEGIN
  IF p_name IS NULL OR p_name !~ '^[a-z0-9][a-z0-9_.:-]{0,99}$' THEN
    RAISE EXCEPTION 'reply rule name must be 1 to 100 of a-z 0-9 _ . : - (starting with a letter or digit), got %',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_action IS NULL OR p_action NOT IN ('suspend_site', 'suspend_service', 'bounce', 'retry') THEN
    RAISE EXCEPTION 'reply rule action must be suspend_site, suspend_service, bounce or retry, got %',
      p_action USING ERRCODE = 'ED005';
  END IF;
  IF p_smtp_code IS NULL AND p_enhanced_code IS NULL AND p_pattern IS NULL AND p_transport_code IS NULL THEN
    RAISE EXCEPTION 'reply rule %: give at least one of smtp_code, enhanced_code, pattern, transport_code',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_smtp_code IS NOT NULL AND p_smtp_code NOT BETWEEN 200 AND 599 THEN
    RAISE EXCEPTION 'reply rule %: smtp_code must be a reply code 200 to 599', p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_enhanced_code IS NOT NULL AND p_enhanced_code !~ '^[245]\.([0-9]{1,3}\.([0-9]{1,3})?)?$' THEN
    RAISE EXCEPTION 'reply rule %: enhanced_code must be like 4.7.28, or a class prefix ending with a dot like 4.7.',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_pattern IS NOT NULL AND (length(p_pattern) NOT BETWEEN 1 AND 500 OR NOT edm.reply_pattern_ok(p_pattern)) THEN
    RAISE EXCEPTION 'reply rule %: pattern must be a valid regular expression of 1 to 500 characters',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF v_tcode IS NOT NULL AND v_tcode !~ '^[a-z0-9_-]{1,20}:[a-z0-9_.-]{1,80}$' THEN
    RAISE EXCEPTION 'reply rule %: transport_code must be kind:code, e.g. http:429 or ses:throttling',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_site IS NOT NULL AND NOT EXISTS (SELECT 1 FROM edm.sites s WHERE s.site = p_site) THEN
    RAISE EXCEPTION 'unknown site %', p_site USING ERRCODE = 'ED001';
  END IF;
  IF p_priority IS NULL OR p_priority NOT BETWEEN 0 AND 1000000 THEN
    RAISE EXCEPTION 'reply rule %: priority must be 0 to 1000000', p_name USING ERRCODE = 'ED005';
  END IF;
  IF (p_action = 'bounce') <> (p_duration_s IS NULL) THEN
    RAISE EXCEPTION 'reply rule %: % needs %', p_name, p_action,
      CASE WHEN p_action = 'bounce' THEN 'no duration' ELSE 'a duration in seconds' END
      USING ERRCODE = 'ED005';
  END IF;
  IF p_duration_s IS NOT NULL AND p_duration_s NOT BETWEEN 1 AND 2592000 THEN
    RAISE EXCEPTION 'reply rule %: duration must be 1 s to 30 days', p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_escalation_factor IS NULL OR NOT (p_escalation_factor BETWEEN 1 AND 100) THEN
    RAISE EXCEPTION 'reply rule %: escalation factor must be 1 to 100', p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_max_duration_s IS NOT NULL AND (p_duration_s IS NULL OR p_max_duration_s NOT BETWEEN p_duration_s AND 2592000) THEN
    RAISE EXCEPTION 'reply rule %: max duration must be at least the duration and at most 30 days',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_reset_after_s IS NULL OR p_reset_after_s NOT BETWEEN 0 AND 2592000 THEN
    RAISE EXCEPTION 'reply rule %: reset_after must be 0 s to 30 days', p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_enabled IS NULL OR p_description IS NULL OR length(p_description) > 500 THEN
    RAISE EXCEPTION 'reply rule %: enabled and a description of at most 500 characters are required',
      p_name USING ERRCODE = 'ED005';
  END IF;
  INSERT INTO edm.reply_rules AS r
    (name, priority, enabled, source, site, smtp_code, enhanced_code, pattern, transport_code,
     action, duration_s, escalation_factor, max_duration_s, reset_after_s, description, updated_at)
  VALUES (p_name, p_priority, p_enabled, 'admin', p_site, p_smtp_code, p_enhanced_code, p_pattern,
          v_tcode, p_action, p_duration_s, p_escalation_factor, p_max_duration_s, p_reset_after_s,
          p_description, now())
  ON CONFLICT (name) DO UPDATE
    SET priority = EXCLUDED.priority, enabled = EXCLUDED.enabled, source = 'admin',
        site = EXCLUDED.site, smtp_code = EXCLUDED.smtp_code,
        enhanced_code = EXCLUDED.enhanced_code, pattern = EXCLUDED.pattern,
        transport_code = EXCLUDED.transport_code, action = EXCLUDED.action,
        duration_s = EXCLUDED.duration_s, escalation_factor = EXCLUDED.escalation_factor,
        max_duration_s = EXCLUDED.max_duration_s, reset_after_s = EXCLUDED.reset_after_s,
        description = EXCLUDED.description, updated_at = EXCLUDED.updated_at
  RETURNING r.rule_id INTO v_id;
  RETURN v_id;
END;
$function$;
COMMENT ON FUNCTION edm.set_reply_rule(text,text,integer,text,text,text,text,integer,integer,double precision,integer,integer,boolean,text) IS 'Creates or replaces (by name) a reply rule; an edited shipped rule becomes source admin. Returns its rule_id. Raises ED005 for a bad name, action, code, pattern (an invalid regular expression), duration or escalation, and ED001 for an unknown site; nothing is written then.';
REVOKE ALL ON FUNCTION edm.set_reply_rule(text,text,integer,text,text,text,text,integer,integer,double precision,integer,integer,boolean,text) FROM PUBLIC;

CREATE FUNCTION edm.enable_reply_rule(p_name text, p_enabled boolean DEFAULT true)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  IF p_enabled IS NULL THEN
    RAISE EXCEPTION 'enable_reply_rule: enabled must be true or false' USING ERRCODE = 'ED005';
  END IF;
  UPDATE edm.reply_rules r SET enabled = p_enabled, updated_at = now() WHERE r.name = p_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown reply rule %', p_name USING ERRCODE = 'ED001';
  END IF;
END;
$function$;
COMMENT ON FUNCTION edm.enable_reply_rule(text,boolean) IS 'Enables (p_enabled true) or disables a reply rule by name; its source is kept. Raises ED001 for an unknown name.';
REVOKE ALL ON FUNCTION edm.enable_reply_rule(text,boolean) FROM PUBLIC;

CREATE FUNCTION edm.delete_reply_rule(p_name text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
  DELETE FROM edm.reply_rules r WHERE r.name = p_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown reply rule %', p_name USING ERRCODE = 'ED001';
  END IF;
END;
$function$;
COMMENT ON FUNCTION edm.delete_reply_rule(text) IS 'Deletes a reply rule by name (its log rows keep its name). Raises ED001 for an unknown name.';
REVOKE ALL ON FUNCTION edm.delete_reply_rule(text) FROM PUBLIC;

CREATE FUNCTION edm.trim_shaping_actions(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  DELETE FROM edm.shaping_actions a
  WHERE a.at < coalesce(p_now, now())
               - make_interval(days => edm.config_int('retention.shaping_action_days'))
    AND (a.until IS NULL OR a.until < coalesce(p_now, now()));
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.trim_shaping_actions(timestamp with time zone) IS 'Deletes reply-rule log rows (edm.shaping_actions) older than retention.shaping_action_days at p_now whose action has ended; returns how many. A step of edm.run_sweeps (shaping_actions_trimmed).';
REVOKE ALL ON FUNCTION edm.trim_shaping_actions(timestamp with time zone) FROM PUBLIC;

CREATE VIEW edm.site_status AS
 SELECT site,
    description,
    (( SELECT count(*) AS count
           FROM edm.site_domains d
          WHERE (d.site = st.site)))::integer AS domains,
    ARRAY( SELECT x.service_id
           FROM edm.site_suspensions x
          WHERE ((x.site = st.site) AND (x.until > now()))
          ORDER BY x.service_id) AS suspended_services,
    ( SELECT max(x.until) AS max
           FROM edm.site_suspensions x
          WHERE ((x.site = st.site) AND (x.until > now()))) AS suspended_until,
    ( SELECT COALESCE(jsonb_agg(jsonb_build_object('scope', ls.scope, 'service_id', ls.service_id, 'name', ls.limit_name, 'kind', ls.kind, 'max_count', ls.max_count, 'window_ms', ls.window_ms, 'headroom', ls.headroom, 'next_free_at', ls.next_free_at) ORDER BY ls.scope, ls.service_id, ls.limit_name), '[]'::jsonb) AS "coalesce"
           FROM edm.shaping_limit_status ls
          WHERE (ls.site = st.site)) AS limits,
    ( SELECT max(ls.next_free_at) AS max
           FROM edm.shaping_limit_status ls
          WHERE ((ls.site = st.site) AND (ls.scope = 'site'::text))) AS limited_until
   FROM edm.sites st;
COMMENT ON VIEW edm.site_status IS 'Per destination site: its domains, the services suspended for it now and until when, and its limits (site scope and per service) with headroom.';
COMMENT ON COLUMN edm.site_status.site IS 'Site.';
COMMENT ON COLUMN edm.site_status.description IS 'Whose mail system it is.';
COMMENT ON COLUMN edm.site_status.domains IS 'Domains mapped to the site.';
COMMENT ON COLUMN edm.site_status.suspended_services IS 'Services suspended for the site now (edm.site_suspensions).';
COMMENT ON COLUMN edm.site_status.suspended_until IS 'End of the latest suspension in force; NULL when none.';
COMMENT ON COLUMN edm.site_status.limits IS 'Its limits, site scope and service_site scope, as JSON objects {scope, service_id, name, kind, max_count, window_ms, headroom, next_free_at}.';
COMMENT ON COLUMN edm.site_status.limited_until IS 'When the site''s own (all-services) limits next admit a send; NULL when they do now or there are none.';

CREATE VIEW edm.site_suspension_status AS
 SELECT x.service_id,
    s.name AS service_name,
    x.site,
    x.until,
    x.level,
    (x.until > now()) AS in_force,
    GREATEST((x.until - now()), '00:00:00'::interval) AS remaining,
    x.created_at,
    x.reason,
    a.rule_id,
    a.rule_name,
    a.at AS last_reply_at,
    a.code AS last_code,
    a.reply AS last_reply
   FROM ((edm.site_suspensions x
     JOIN edm.services s ON ((s.service_id = x.service_id)))
     LEFT JOIN LATERAL ( SELECT sa.rule_id,
            sa.rule_name,
            sa.at,
            sa.code,
            sa.reply
           FROM edm.shaping_actions sa
          WHERE ((sa.service_id = x.service_id) AND (sa.site = x.site) AND (sa.action = 'suspend_site'::text))
          ORDER BY sa.at DESC, sa.action_id DESC
         LIMIT 1) a ON (true));
COMMENT ON VIEW edm.site_suspension_status IS 'Every (service, site) suspension, in force or expired (kept for escalation), with the rule and the latest reply that set it: what a DBA reads to see why a service does not send to a site.';
COMMENT ON COLUMN edm.site_suspension_status.service_id IS 'Suspended service.';
COMMENT ON COLUMN edm.site_suspension_status.service_name IS 'Its name.';
COMMENT ON COLUMN edm.site_suspension_status.site IS 'Site it must not send to.';
COMMENT ON COLUMN edm.site_suspension_status.until IS 'End of the suspension.';
COMMENT ON COLUMN edm.site_suspension_status.level IS 'Escalation level (1: first suspension after a calm period).';
COMMENT ON COLUMN edm.site_suspension_status.in_force IS 'True while the suspension applies.';
COMMENT ON COLUMN edm.site_suspension_status.remaining IS 'Time left (0 once expired).';
COMMENT ON COLUMN edm.site_suspension_status.created_at IS 'When the current suspension started.';
COMMENT ON COLUMN edm.site_suspension_status.reason IS 'Why: the rule and the reply, or the text given by hand.';
COMMENT ON COLUMN edm.site_suspension_status.rule_id IS 'Reply rule of the latest suspend_site action on the pair (NULL: set by hand or the rule was deleted).';
COMMENT ON COLUMN edm.site_suspension_status.rule_name IS 'Its name.';
COMMENT ON COLUMN edm.site_suspension_status.last_reply_at IS 'When that reply was completed.';
COMMENT ON COLUMN edm.site_suspension_status.last_code IS 'Its SMTP code.';
COMMENT ON COLUMN edm.site_suspension_status.last_reply IS 'Its text.';

-- ==========================================================================
-- Dispatch: claim, complete, leases
-- What every dispatcher calls: the atomic claim, fenced completion, lease recovery.
-- ==========================================================================

CREATE TABLE edm.dispatchers (
  dispatcher_id text NOT NULL,
  hostname text,
  pid integer,
  started_at timestamp with time zone DEFAULT now() NOT NULL,
  heartbeat_at timestamp with time zone DEFAULT now() NOT NULL,
  stopped_at timestamp with time zone,
  CONSTRAINT dispatchers_pkey PRIMARY KEY (dispatcher_id),
  CONSTRAINT dispatchers_dispatcher_id_check CHECK (((length(dispatcher_id) >= 1) AND (length(dispatcher_id) <= 200)))
);
COMMENT ON TABLE edm.dispatchers IS 'Dispatcher processes seen, with their heartbeats.';
COMMENT ON COLUMN edm.dispatchers.dispatcher_id IS 'Unique id of the process (host:pid:random); the lease owner of its claims.';
COMMENT ON COLUMN edm.dispatchers.hostname IS 'Host it runs on.';
COMMENT ON COLUMN edm.dispatchers.pid IS 'Process id on that host.';
COMMENT ON COLUMN edm.dispatchers.started_at IS 'When it started.';
COMMENT ON COLUMN edm.dispatchers.heartbeat_at IS 'Its latest sign of life.';
COMMENT ON COLUMN edm.dispatchers.stopped_at IS 'When it stopped cleanly, NULL while running or after a crash.';

CREATE TABLE edm.send_events (
  occurred_at timestamp with time zone NOT NULL,
  subtask_id bigint NOT NULL,
  task_id bigint NOT NULL,
  user_id text NOT NULL,
  service_id bigint,
  kind text NOT NULL,
  attempt smallint,
  started_at timestamp with time zone,
  code integer,
  response_ms integer,
  dispatcher text,
  detail text,
  CONSTRAINT send_events_kind_check CHECK ((kind = ANY (ARRAY['sent'::text, 'retry'::text, 'failed'::text, 'service_failure'::text, 'released'::text, 'lease_expired'::text, 'late_completion'::text, 'cancelled'::text, 'uncertain'::text, 'render_error'::text, 'throttled'::text])))
) PARTITION BY RANGE (occurred_at);
CREATE TABLE edm.send_events_default PARTITION OF edm.send_events DEFAULT;
COMMENT ON TABLE edm.send_events_default IS 'Catch-all partition of send_events for days without their own partition.';
COMMENT ON TABLE edm.send_events IS 'Append-only history of attempt outcomes, partitioned by day. lease_expired rows are the recorded uncertain outcomes of I1.';
COMMENT ON COLUMN edm.send_events.occurred_at IS 'When the outcome was recorded (partition key).';
COMMENT ON COLUMN edm.send_events.subtask_id IS 'Subtask concerned.';
COMMENT ON COLUMN edm.send_events.task_id IS 'Task of the subtask.';
COMMENT ON COLUMN edm.send_events.user_id IS 'Owner of the task.';
COMMENT ON COLUMN edm.send_events.service_id IS 'Service of the attempt.';
COMMENT ON COLUMN edm.send_events.kind IS 'sent, retry, failed, service_failure, released, lease_expired, late_completion, cancelled, uncertain (connection lost after the final dot), render_error (the message could not be built; nothing was spent) or throttled (a reply rule suspended the (service, site) pair or the service; the subtask went back to pending, spending nothing).';
COMMENT ON COLUMN edm.send_events.attempt IS 'Attempt number of the subtask.';
COMMENT ON COLUMN edm.send_events.started_at IS 'Slot of the attempt (when its send could start).';
COMMENT ON COLUMN edm.send_events.code IS 'Provider reply code.';
COMMENT ON COLUMN edm.send_events.response_ms IS 'Provider response time in milliseconds.';
COMMENT ON COLUMN edm.send_events.dispatcher IS 'Dispatcher that reported the outcome (or held the expired lease).';
COMMENT ON COLUMN edm.send_events.detail IS 'Error text or reason.';
CREATE INDEX send_events_subtask_idx ON edm.send_events USING btree (subtask_id);
COMMENT ON INDEX edm.send_events_subtask_idx IS 'History of one subtask (duplicate and lease-expiry audits).';
CREATE INDEX send_events_time_idx ON edm.send_events USING btree (occurred_at, service_id);
COMMENT ON INDEX edm.send_events_time_idx IS 'Windows of history per service (monitoring views, roll-ups).';

CREATE SEQUENCE edm.serve_seq;
COMMENT ON SEQUENCE edm.serve_seq IS 'Strictly increasing stamp of claims; orders users and tasks by how recently they were served.';

CREATE FUNCTION edm.claim_v2(p_owner text, p_batch integer DEFAULT 1, p_lease_seconds integer DEFAULT NULL::integer, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone, p_per_service integer DEFAULT 1, p_lookahead_ms integer DEFAULT NULL::integer, p_skip_services bigint[] DEFAULT '{}'::bigint[])
 RETURNS TABLE(subtask_id bigint, task_id bigint, user_id text, service_id bigint, email text, contact_id bigint, template_idx smallint, vars jsonb, attempt smallint, send_at timestamp with time zone, lease_expires_at timestamp with time zone)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET jit TO 'off'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_now   timestamptz := coalesce(p_now, now());
  v_lease interval;
  v_svc   record;
  v_user  text;
  v_task  bigint;
  v_sub   bigint;
  v_prio  integer;
  v_task2 bigint;
  v_skip  text[] := '{}';
  v_tried bigint[];
  -- what this call claimed, one entry per subtask, in claim order
  c_svc   bigint[] := '{}';
  c_sub   bigint[] := '{}';
  c_task  bigint[] := '{}';
  c_user  text[] := '{}';
  -- rotation state of this call: served users / tasks, least recently served first
  r_users text[] := '{}';
  r_tasks bigint[] := '{}';
  v_seqs  bigint[];
  v_cands text[];
  v_pool  text[];
  v_small integer := edm.config_int('queue.small_pool_grantees');
  -- slots of this call: one per claimed subtask, in claim order
  c_slot  timestamptz[] := '{}';
  -- services found blocked by an extra limit before any slot, and until when
  b_svc   bigint[] := '{}';
  b_until timestamptz[] := '{}';
  v_horizon timestamptz;
  v_lead_at timestamptz;
  v_slot  timestamptz;
  v_k     integer;
  v_hold  interval := make_interval(secs => edm.config_int('queue.service_hold_seconds'));
  -- a batched fill (0014): how many slots to take at once, and what it found
  v_want  integer;
  b_user  text[];
  b_task  bigint[];
  b_sub   bigint[];
  i       integer;
  -- shaping (0016): which layers are in use at all (one probe each, per call)
  v_global   boolean;
  v_site_lim boolean;
  v_user_lim boolean;
  v_task_lim boolean;
  v_tx       boolean;
  v_susp_any boolean;
  v_tx_max   integer;  -- transactional slots in a row a service may give while bulk waits
  v_margin   interval := make_interval(secs => coalesce(
               edm.config_int('queue.shaping_arrival_margin_ms'), 25) / 1000.0);
  -- ...for the current service
  v_susp     text[];   -- its suspended sites
  v_lsites   text[];   -- sites with limits that apply to it
  v_shaped   boolean;  -- anything beyond 0014's rules to check
  v_tx_run   integer;
  -- ...for the current slot
  v_skip_call text[] := '{}';  -- users skipped for the whole call (v_skip adds this slot's)
  -- 0028: where the rotation head's users this call has neither served nor
  -- skipped begin (every user before it has been)
  v_from     integer := 1;
  v_blocked  text[];   -- sites this slot may not go to
  v_ok_sites text[];   -- sites found with headroom at this slot
  v_site     text;
  v_free     timestamptz;
  v_keys     text[];
  v_fixed    bigint;   -- the transactional task chosen for this slot
  v_tx_tried bigint[];
  v_tx_slot  boolean;  -- this slot may still go to transactional work ahead of the rotation
  v_stop     boolean := false;
  -- 0026: the current list of ranked services, and the most it may hold
  v_order    bigint[] := '{}';
  v_lim      integer;
  -- 0027: the second ranking, the position in it of the next chunk, and the
  -- length of a chunk (that of the first list)
  v_rest     bigint[];
  v_pos      integer;
  v_chunk    integer;
  -- (a recipient's site is its stored domain's row in edm.site_domains, read
  -- at the claim: a mapping added later applies to queued recipients too)
  -- The shaping limits this call uses, read once (locked, or guarded by
  -- the user / task row lock), counted here and written back once at the
  -- end: nobody else may change them meanwhile.
  m_keys     text[] := '{}';   -- scope_key of each limit read
  m_lims     edm.service_limits[] := '{}';
  m_dirty    boolean[] := '{}';
  m_seen     text[] := '{}';   -- scopes read (with or without limits)
  m_held     text[] := '{}';   -- scopes with a limit locked by another transaction
  v_nk       text[];
  v_nl       edm.service_limits[];
  v_nh       text[];
  -- 0022: recipients are left out by their stored domain (subtasks.domain):
  v_sdom     text[];   -- the domains of the service's suspended sites
  v_bdom     text[];   -- the domains of the sites in v_blocked
  v_dom      text;     -- the domain of the recipient found
  b_site     text[];   -- the sites of the fill's recipients (when site limits apply)
  -- the domains of the sites that have limits, and their sites (read once per
  -- call): a recipient's site, as far as limits go, without a query
  v_ldoms      text[] := '{}';
  v_ldom_sites text[] := '{}';
  v_tx_here  boolean;  -- transactional work may take this service's slots
  v_fill     boolean;  -- the batched fill may take the next slots
  v_fill_used boolean;
  j          integer;
  v_idx      integer[];  -- positions in m_keys of a slot's limits
  v_all_lsites text[];   -- sites with site-scope limits (read once per call)
  v_key      text;
  -- 0025: the fill's users' and tasks' has_limits flags, and the tasks it
  -- found nothing in at the current service (its later slots skip them)
  b_ulim     boolean[];
  b_tlim     boolean[];
  v_empty    bigint[];
  -- 0030: the single-user pass (once per service), and what it found: the
  -- user's tasks in the loop's order with their priority levels (1 the
  -- highest), the recipients taken from each (w_sub, task by task: w_n of them
  -- from w_off + 1), the most asked of one task, and the first (level, round,
  -- task) not known
  v_one      boolean;
  w_task     bigint[];
  w_lvl      integer[];
  w_sub      bigint[];
  w_n        integer[];
  w_off      integer[];
  w_got      bigint[];
  v_l        integer;
  v_cut      integer[];
  -- 0030: the small pool's users not served in the call, in pool order (the
  -- slots loop's first lookup walks these, not the whole pool)
  v_left     text[];
BEGIN
  IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'claim: owner must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF p_batch IS NULL OR p_batch NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'claim: batch size must be between 1 and 1000, got %', p_batch
      USING ERRCODE = 'ED005';
  END IF;
  IF p_lease_seconds IS NOT NULL AND p_lease_seconds NOT BETWEEN 1 AND 86400 THEN
    RAISE EXCEPTION 'claim: lease must be between 1 and 86400 seconds, got %', p_lease_seconds
      USING ERRCODE = 'ED005';
  END IF;
  IF p_per_service IS NULL OR p_per_service NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'claim: per-service batch must be between 1 and 1000, got %', p_per_service
      USING ERRCODE = 'ED005';
  END IF;
  IF p_lookahead_ms IS NOT NULL AND p_lookahead_ms NOT BETWEEN 0 AND 60000 THEN
    RAISE EXCEPTION 'claim: lookahead must be between 0 and 60000 ms, got %', p_lookahead_ms
      USING ERRCODE = 'ED005';
  END IF;
  v_lease := make_interval(secs => coalesce(p_lease_seconds,
                                            edm.config_int('queue.service_reservation_timeout')));
  -- A service whose next slot comes within the lookahead may be claimed now.
  v_horizon := v_now + coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms'))
                       * interval '1 millisecond';
  v_lead_at := CASE WHEN p_now IS NULL THEN clock_timestamp() ELSE v_now END
               + least(coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms')),
                       edm.config_int('queue.slot_lead_ms')) * interval '1 millisecond';
  -- (0031) and no later than the horizon: counted from the claim's start,
  -- which the server's clock has passed
  v_lead_at := least(v_lead_at, v_horizon);
  PERFORM edm.start_due_tasks(v_now);
  IF NOT EXISTS (SELECT 1 FROM edm.users u WHERE u.claimable_tasks > 0) THEN
    RETURN;
  END IF;

  -- Which shaping layers are in use (0016): each an index probe, empty when
  -- unused; with none, everything below runs as in 0014.
  SELECT EXISTS (SELECT 1 FROM edm.shaping_limits l WHERE l.scope = 'global'),
         EXISTS (SELECT 1 FROM edm.shaping_limits l WHERE l.scope IN ('site', 'service_site')),
         EXISTS (SELECT 1 FROM edm.users u WHERE u.has_limits),
         EXISTS (SELECT 1 FROM edm.tasks t WHERE t.has_limits AND t.claimable),
         EXISTS (SELECT 1 FROM edm.tasks t WHERE t.transactional AND t.claimable),
         EXISTS (SELECT 1 FROM edm.site_suspensions x WHERE x.until > v_now)
  INTO v_global, v_site_lim, v_user_lim, v_task_lim, v_tx, v_susp_any;
  IF v_site_lim THEN
    SELECT coalesce(array_agg(sd.domain), '{}'), coalesce(array_agg(sd.site), '{}')
    INTO v_ldoms, v_ldom_sites
    FROM edm.site_domains sd
    WHERE sd.site IN (SELECT l.site FROM edm.shaping_limits l
                      WHERE l.scope IN ('site', 'service_site'));
  END IF;
  IF v_tx THEN
    -- share s: at most s / (1 - s) transactional slots in a row, then one in the rotation
    v_tx_max := (SELECT CASE WHEN x.s >= 1 THEN 2147483647 ELSE floor(x.s / (1 - x.s))::integer END
                 FROM (SELECT coalesce(edm.config_num('queue.transactional_share'), 0.8)::numeric AS s) x);
  END IF;

  -- The head of the rotation, read once per call: the next users in line
  -- (least recently served first) with claimable work, locked for this call.
  v_cands := ARRAY(
    SELECT u.user_id FROM edm.users u
    WHERE u.claimable_tasks > 0
    ORDER BY u.last_served_seq, u.user_id
    LIMIT 2 * p_batch
    FOR UPDATE OF u SKIP LOCKED);

  -- Ready services (next slot within the horizon, under the daily quota,
  -- not held by another dispatcher, not one the caller has no room for),
  -- least used quota first.
  -- (0026: ranked as a list of ids, a top-N, then locked from the list in
  -- its order; a call the list does not fill ranks all the services not seen yet)
  v_chunk := 2 * p_batch + 8;
  v_lim := v_chunk;
  <<ranked>>
  LOOP
  IF v_rest IS NOT NULL THEN
    -- (0027) the next chunk of the second ranking, without the services none
    -- of whose grantees has claimable work: these could give no slot
    EXIT ranked WHEN v_pos > cardinality(v_rest);
    v_order := ARRAY(
      SELECT x.id FROM unnest(v_rest[v_pos : v_pos + v_chunk - 1]) x(id)
      WHERE EXISTS (
        SELECT 1 FROM edm.grants g
        WHERE g.service_id = x.id
          -- (a probe per grant, up to the first user with work: a join may
          -- hash every user for a pool's thousands of grants)
          AND (SELECT u.claimable_tasks FROM edm.users u WHERE u.user_id = g.user_id) > 0));
    v_pos := v_pos + v_chunk;
  ELSE
  v_order := ARRAY(
    SELECT s.service_id FROM edm.services s
    WHERE s.enabled
      AND s.next_available_at <= v_horizon
      AND edm.service_sent_today(s, v_now) < s.daily_quota
      AND (s.held_until IS NULL OR s.held_until <= v_now OR s.held_by = p_owner)
      AND s.service_id <> ALL (p_skip_services)
      AND s.service_id <> ALL (v_order)  -- the second ranking: all but the first list
    ORDER BY edm.service_sent_today(s, v_now)::double precision / s.daily_quota,
             s.success_rate DESC, s.service_id
    LIMIT v_lim);
  EXIT ranked WHEN cardinality(v_order) = 0;
  IF v_lim = 2147483647 THEN  -- the second ranking: taken a chunk at a time (above)
    v_rest := v_order;
    v_pos := 1;
    CONTINUE ranked;
  END IF;
  END IF;
  FOR v_svc IN
    SELECT s.service_id, s.quota_tz, s.interval_ms, s.daily_quota, s.has_limits, s.tx_run,
           s.next_available_at, edm.service_sent_today(s, v_now) AS sent_today,
           s.site_rules_until > v_now AS own_site_rules
    FROM edm.services s
    WHERE s.service_id = ANY (v_order)
      AND s.enabled
      AND s.next_available_at <= v_horizon
      AND edm.service_sent_today(s, v_now) < s.daily_quota
      AND (s.held_until IS NULL OR s.held_until <= v_now OR s.held_by = p_owner)
    ORDER BY edm.service_sent_today(s, v_now)::double precision / s.daily_quota,
             s.success_rate DESC, s.service_id
    FOR UPDATE OF s SKIP LOCKED
  LOOP
    v_sub := NULL;
    v_slot := greatest(v_now, v_svc.next_available_at);
    IF (v_svc.interval_ms > 0 OR v_svc.has_limits) AND v_slot < v_lead_at THEN
      v_slot := v_lead_at;
    END IF;
    v_k := 0;
    -- Shaping of this service: its suspended sites and the sites whose limits apply to it.
    v_susp := '{}';
    v_lsites := '{}';
    -- (statements written out here, not calls of SQL functions holding
    -- queries: those are planned again on every call)
    -- (only a service whose row says it has some: 0025)
    IF v_susp_any AND v_svc.own_site_rules THEN
      v_susp := ARRAY(SELECT x.site FROM edm.site_suspensions x
                      WHERE x.service_id = v_svc.service_id AND x.until > v_now);
    END IF;
    IF v_site_lim THEN
      -- the sites limited across all services (read once per call), and this service's
      IF v_all_lsites IS NULL THEN
        v_all_lsites := ARRAY(SELECT DISTINCT l.site FROM edm.shaping_limits l
                              WHERE l.scope = 'site');
      END IF;
      v_lsites := v_all_lsites;
      IF v_svc.own_site_rules THEN
        v_lsites := v_lsites || ARRAY(
          SELECT DISTINCT l.site FROM edm.shaping_limits l
          WHERE l.scope = 'service_site' AND l.service_id = v_svc.service_id
            AND l.site <> ALL (v_all_lsites));
      END IF;
    END IF;
    v_shaped := v_global OR v_user_lim OR v_task_lim OR v_tx
                OR cardinality(v_susp) > 0 OR cardinality(v_lsites) > 0;
    -- a site is a set of domains: a recipient is left out by its stored domain
    v_sdom := '{}';
    IF cardinality(v_susp) > 0 THEN
      v_sdom := ARRAY(SELECT sd.domain FROM edm.site_domains sd WHERE sd.site = ANY (v_susp));
    END IF;
    v_empty := '{}';
    v_tx_run := v_svc.tx_run;
    v_skip := v_skip_call;
    v_pool := NULL;
    IF NOT EXISTS (SELECT 1 FROM edm.grants g WHERE g.service_id = v_svc.service_id
                   OFFSET v_small) THEN
      v_pool := ARRAY(SELECT g.user_id FROM edm.grants g WHERE g.service_id = v_svc.service_id);
      v_pool := ARRAY(SELECT u.user_id FROM edm.users u
                      WHERE u.user_id = ANY (v_pool) AND u.claimable_tasks > 0
                      ORDER BY u.last_served_seq, u.user_id);
      -- (0027: a small pool none of whose users has work gives nothing)
      CONTINUE WHEN cardinality(v_pool) = 0;
    END IF;
    -- A small pool with no work outside the service's suspended sites: the
    -- fill and the slots would find nothing (0025).
    -- (two IFs: a condition holding a query is a query, whatever its first
    -- operand says)
    IF cardinality(v_sdom) > 0 AND v_pool IS NOT NULL AND NOT v_svc.has_limits THEN
      IF NOT EXISTS (SELECT 1 FROM edm.tasks t
                     WHERE t.user_id = ANY (v_pool) AND t.claimable
                       AND edm.task_sendable_outside(t.task_id, v_now, v_sdom)) THEN
        CONTINUE;
      END IF;
    END IF;
    -- Batched fill (0014), for a service without extra limits whose slots all
    -- go to the rotation (no transactional work may use it). Its suspended
    -- sites (fixed for the call) are left out as below; every shaping layer
    -- is checked at each slot after the fill's statement (0022).
    v_blocked := v_susp;
    v_bdom := v_sdom;
    v_tx_here := false;
    IF v_tx THEN
      v_tx_here := EXISTS (
        SELECT 1 FROM edm.tasks t
        WHERE t.transactional AND t.claimable AND t.user_id <> ALL (v_skip)
          AND (
            SELECT true FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = t.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = t.user_id AND g2.priority > g.priority
                  AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id))
            LIMIT 1));
    END IF;
    -- (the fill runs at the service's first slot, or at the first slot after
    -- the transactional lane found no work for the service)
    v_fill := NOT v_svc.has_limits AND NOT v_tx_here;
    v_one := true;
    v_left := NULL;
    v_fill_used := false;
    -- One iteration per slot: each to the next user in the fair order
    -- (r_users rotates), or ahead of it to transactional work (0016).
    <<slots>>
    LOOP
    EXIT slots WHEN v_k >= p_per_service OR cardinality(c_sub) >= p_batch;
    -- (0028) the head's leading users this call has served or skipped: both
    -- lookups below leave them out, so they start after them
    WHILE v_from <= cardinality(v_cands)
          AND (v_cands[v_from] = ANY (r_users) OR v_cands[v_from] = ANY (v_skip_call)) LOOP
      v_from := v_from + 1;
    END LOOP;
    IF v_fill THEN
      v_fill := false;
      v_fill_used := true;
      v_skip := v_skip_call;
      v_blocked := v_susp;
      v_bdom := v_sdom;
      v_want := least(p_per_service - v_k, p_batch - cardinality(c_sub),
                      v_svc.daily_quota - v_svc.sent_today - v_k,
                      CASE WHEN v_svc.interval_ms > 0
                           THEN floor(extract(epoch FROM v_horizon - v_slot) * 1000
                                      / v_svc.interval_ms)::integer + 1
                           ELSE p_per_service END);
      IF v_want > 0 THEN
        SELECT array_agg(b.user_id ORDER BY b.n), array_agg(b.task_id ORDER BY b.n),
               array_agg(b.sub_id ORDER BY b.n), array_agg(b.domain ORDER BY b.n),
               array_agg(b.tlim ORDER BY b.n)
        INTO b_user, b_task, b_sub, b_site, b_tlim
        FROM (
          SELECT bc.n, bc.user_id, bt.task_id, coalesce(br.sub_id, bf.sub_id, bx.sub_id) AS sub_id,
                 coalesce(br.domain, bf.domain, bx.domain) AS domain,
                 bt.has_limits AS tlim
          FROM (
            SELECT c.user_id, c.n
            FROM unnest(coalesce(v_pool, v_cands[v_from:])) WITH ORDINALITY AS c(user_id, n)
            WHERE c.user_id <> ALL (v_skip) AND c.user_id <> ALL (r_users)
              -- CASE keeps the loop's order: a user is locked only once it fits
              AND CASE WHEN (
                SELECT true FROM edm.grants g
                WHERE g.service_id = v_svc.service_id AND g.user_id = c.user_id
                  AND NOT EXISTS (
                    SELECT 1 FROM edm.grants g2
                    WHERE g2.user_id = c.user_id AND g2.priority > g.priority
                      AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                           FROM edm.services s2 WHERE s2.service_id = g2.service_id))
                LIMIT 1)
              -- a pool's users are not locked yet: one locked by another
              -- claim is being served, leave it out
              THEN v_pool IS NULL
                   OR coalesce((SELECT true FROM edm.users pu
                                WHERE pu.user_id = c.user_id AND pu.claimable_tasks > 0
                                FOR UPDATE OF pu SKIP LOCKED), false)
              ELSE false END
            ORDER BY c.n
            LIMIT v_want) bc
          LEFT JOIN LATERAL (
            SELECT bt0.task_id, bt0.has_limits FROM edm.tasks bt0
            WHERE bt0.user_id = bc.user_id AND bt0.claimable
            ORDER BY bt0.priority DESC, bt0.last_served_seq, bt0.task_id
            LIMIT 1
            FOR UPDATE OF bt0 SKIP LOCKED) bt ON true
          LEFT JOIN LATERAL (
            SELECT bs0.subtask_id AS sub_id, bs0.domain FROM edm.subtasks bs0
            WHERE cardinality(v_bdom) = 0
              AND bs0.task_id = bt.task_id AND bs0.status = 'pending'
              AND bs0.not_before > '-infinity' AND bs0.not_before <= v_now
              AND bs0.subtask_id <> ALL (c_sub)
            ORDER BY bs0.not_before, bs0.subtask_id
            LIMIT 1
            FOR UPDATE OF bs0 SKIP LOCKED) br ON true
          -- the fresh lookup runs only for a task without a due retry
          LEFT JOIN LATERAL (
            SELECT bs1.subtask_id AS sub_id, bs1.domain FROM edm.subtasks bs1
            WHERE cardinality(v_bdom) = 0 AND br.sub_id IS NULL
              AND bs1.task_id = bt.task_id AND bs1.status = 'pending'
              AND bs1.not_before = '-infinity'
              AND bs1.subtask_id <> ALL (c_sub)
            ORDER BY bs1.not_before, bs1.subtask_id
            LIMIT 1
            FOR UPDATE OF bs1 SKIP LOCKED) bf ON true
          -- with suspended sites: both lookups, skipping their domains (0022)
          LEFT JOIN LATERAL (
            -- (a NULL task: the strict function is not called at all; a
            -- filter on its result would run it for every row)
            SELECT bn.subtask_id AS sub_id, bn.domain
            FROM edm.claim_next_subtask(CASE WHEN cardinality(v_bdom) > 0 THEN bt.task_id END,
                                        v_now, c_sub, v_bdom) bn
            WHERE bn.subtask_id IS NOT NULL) bx ON true) b;
        -- (the recipients' sites among the limited ones, from the call's map)
        IF cardinality(v_lsites) > 0 THEN
          FOR i IN 1 .. coalesce(cardinality(b_site), 0) LOOP
            b_site[i] := v_ldom_sites[array_position(v_ldoms, b_site[i])];
          END LOOP;
        ELSE
          b_site := '{}';
        END IF;
        -- (the users' flags only where users have limits: one statement
        -- per fill in such a world, none in others)
        b_ulim := NULL;
        IF v_user_lim AND b_user IS NOT NULL THEN
          b_ulim := ARRAY(SELECT u.has_limits
                          FROM unnest(b_user) WITH ORDINALITY AS x(user_id, n)
                          JOIN edm.users u ON u.user_id = x.user_id
                          ORDER BY x.n);
        END IF;
        IF array_position(b_sub, NULL) IS NOT NULL THEN
          FOR i IN 1 .. cardinality(b_sub) LOOP
            IF b_sub[i] IS NULL AND b_task[i] IS NOT NULL THEN
              v_empty := v_empty || b_task[i];
            END IF;
          END LOOP;
        END IF;
        -- Every shaping layer, at each slot as the loop below checks it
        -- (0022): the limits of all the fill's scopes are read in one
        -- statement; the first slot a limit holds back ends the fill, and
        -- the loop decides that slot (skipping a user, task or site, or
        -- delaying it for the global limit).
        IF v_shaped AND coalesce(cardinality(b_sub), 0) > 0 THEN
          v_keys := '{}';
          IF v_global THEN
            v_keys := v_keys || edm.shaping_key('global', NULL, NULL, NULL, NULL);
          END IF;
          FOR i IN 1 .. cardinality(b_sub) LOOP
            EXIT WHEN b_sub[i] IS NULL;
            -- the users and tasks with limits (their rows are locked by this
            -- call, so their flags cannot change meanwhile)
            IF v_user_lim AND b_ulim[i] THEN
              v_keys := v_keys || edm.shaping_key('user', NULL, NULL, b_user[i], NULL);
            END IF;
            IF v_task_lim AND b_tlim[i] THEN
              v_keys := v_keys || edm.shaping_key('task', NULL, NULL, NULL, b_task[i]);
            END IF;
            IF b_site[i] = ANY (v_lsites) THEN
              v_keys := v_keys || edm.shaping_key('site', b_site[i], NULL, NULL, NULL);
              IF v_svc.own_site_rules THEN
                v_keys := v_keys || edm.shaping_key('service_site', b_site[i], v_svc.service_id,
                                                    NULL, NULL);
              END IF;
            END IF;
          END LOOP;
          v_nk := '{}';  -- the scopes not read yet, each once
          FOREACH v_key IN ARRAY v_keys LOOP
            IF v_key <> ALL (m_seen) AND v_key <> ALL (v_nk) THEN
              v_nk := v_nk || v_key;
            END IF;
          END LOOP;
          v_keys := v_nk;
          IF cardinality(v_keys) > 0 THEN
            SELECT x.keys, x.lims, x.held INTO v_nk, v_nl, v_nh FROM edm.shaping_load(v_keys) x;
            m_keys := m_keys || coalesce(v_nk, '{}');
            m_lims := m_lims || coalesce(v_nl, '{}');
            m_dirty := m_dirty || array_fill(false, ARRAY[coalesce(cardinality(v_nk), 0)]);
            m_held := m_held || coalesce(v_nh, '{}');
            m_seen := m_seen || v_keys;
          END IF;
        END IF;
        FOR i IN 1 .. coalesce(cardinality(b_user), 0) LOOP
          EXIT WHEN b_sub[i] IS NULL;
          IF v_shaped THEN
            -- the scopes that count this send
            v_keys := '{}';
            IF v_global THEN
              v_keys := v_keys || edm.shaping_key('global', NULL, NULL, NULL, NULL);
            END IF;
            IF v_user_lim AND b_ulim[i] THEN
              v_keys := v_keys || edm.shaping_key('user', NULL, NULL, b_user[i], NULL);
            END IF;
            IF v_task_lim AND b_tlim[i] THEN
              v_keys := v_keys || edm.shaping_key('task', NULL, NULL, NULL, b_task[i]);
            END IF;
            IF b_site[i] = ANY (v_lsites) THEN
              v_keys := v_keys || edm.shaping_key('site', b_site[i], NULL, NULL, NULL);
              IF v_svc.own_site_rules THEN
                v_keys := v_keys || edm.shaping_key('service_site', b_site[i], v_svc.service_id,
                                                    NULL, NULL);
              END IF;
            END IF;
            -- (edm.shaping_free and the count, on the positions of the
            -- scopes' limits: array_positions, not a loop over every limit)
            EXIT WHEN v_keys && m_held;
            v_idx := '{}';
            FOREACH v_key IN ARRAY v_keys LOOP
              v_idx := v_idx || array_positions(m_keys, v_key);
            END LOOP;
            v_free := v_slot;
            FOREACH j IN ARRAY v_idx LOOP
              v_free := greatest(v_free, edm.limit_next(m_lims[j], v_slot, 'UTC'));
            END LOOP;
            EXIT WHEN v_free > v_slot;
            FOREACH j IN ARRAY v_idx LOOP
              m_lims[j] := edm.limit_after(m_lims[j], v_slot, 'UTC', v_margin);
              m_dirty[j] := true;
            END LOOP;
            v_tx_run := 0;  -- a slot given in the rotation
          END IF;
          c_svc := c_svc || v_svc.service_id;
          c_sub := c_sub || b_sub[i];
          c_task := c_task || b_task[i];
          c_user := c_user || b_user[i];
          c_slot := c_slot || v_slot;
          r_users := r_users || b_user[i];  -- not served before in this call
          r_tasks := r_tasks || b_task[i];
          v_k := v_k + 1;
          v_slot := v_slot + v_svc.interval_ms * interval '1 millisecond';
        END LOOP;
      END IF;
      CONTINUE slots;
    END IF;
    -- 0030: the pool's one user with work, served already in this call: the
    -- loop below would give it every slot left, one at a time, its tasks in
    -- turn. One pass takes the first of those slots in the loop's order.
    IF v_one AND v_pool IS NOT NULL AND cardinality(v_pool) = 1
       AND v_pool[1] = ANY (r_users) AND v_pool[1] <> ALL (v_skip_call)
       AND NOT v_shaped AND NOT v_svc.has_limits AND NOT v_tx_here
       AND cardinality(v_sdom) = 0 THEN
      v_one := false;
      v_user := v_pool[1];
      v_want := least(p_per_service - v_k, p_batch - cardinality(c_sub),
                      v_svc.daily_quota - v_svc.sent_today - v_k,
                      CASE WHEN v_svc.interval_ms > 0
                           THEN floor(extract(epoch FROM v_horizon - v_slot) * 1000
                                      / v_svc.interval_ms)::integer + 1
                           ELSE p_per_service END);
      -- (its grant here, and no ready service of a higher tier: as the loop
      -- checks at each slot; the slots taken here change neither)
      IF v_want > 1 AND (
          SELECT true FROM edm.grants g
          WHERE g.service_id = v_svc.service_id AND g.user_id = v_user
            AND NOT EXISTS (
              SELECT 1 FROM edm.grants g2
              WHERE g2.user_id = v_user AND g2.priority > g.priority
                AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                     FROM edm.services s2 WHERE s2.service_id = g2.service_id))
          LIMIT 1) THEN
        -- The user's tasks in the loop's order, locked (those served in the
        -- call are locked already); no more than could take a slot each.
        -- (each with its level: the rank of its priority, highest first)
        SELECT coalesce(array_agg(t.task_id ORDER BY t.n), '{}'),
               coalesce(array_agg(t.lvl ORDER BY t.n), '{}')
        INTO w_task, w_lvl
        FROM (SELECT t1.task_id,
                     row_number() OVER (ORDER BY t1.priority DESC, t1.served, t1.pos,
                                        t1.last_served_seq, t1.task_id) AS n,
                     dense_rank() OVER (ORDER BY t1.priority DESC)::integer AS lvl
              FROM (SELECT t0.task_id, t0.priority, t0.last_served_seq,
                           t0.task_id = ANY (r_tasks) AS served,
                           array_position(r_tasks, t0.task_id) AS pos
                    FROM edm.tasks t0
                    WHERE t0.user_id = v_user AND t0.claimable
                      AND t0.task_id <> ALL (v_empty)
                    ORDER BY t0.priority DESC, t0.task_id = ANY (r_tasks),
                             array_position(r_tasks, t0.task_id), t0.last_served_seq,
                             t0.task_id
                    LIMIT v_want
                    FOR UPDATE OF t0 SKIP LOCKED) t1) t;
        v_l := (v_want + cardinality(w_task) - 1) / greatest(cardinality(w_task), 1);
        -- Up to v_l recipients of each task: its due retries, then its lowest
        -- fresh ones (the loop's lookups, v_l at a time).
        w_sub := '{}';
        w_n := '{}';
        w_off := '{}';
        -- the first (level, round, task) past what is known: a task given all
        -- it was asked may hold more (its next round). (Tasks not locked
        -- above may hold some too, but only when the limit gave one round,
        -- v_l = 1: each comes after every task locked, in the last level.)
        v_cut := NULL;
        FOR j IN 1 .. cardinality(w_task) LOOP
          w_got := ARRAY(
            SELECT st.subtask_id FROM edm.subtasks st
            WHERE st.task_id = w_task[j] AND st.status = 'pending'
              AND st.not_before > '-infinity' AND st.not_before <= v_now
              AND st.subtask_id <> ALL (c_sub)
            ORDER BY st.not_before, st.subtask_id
            LIMIT v_l
            FOR UPDATE OF st SKIP LOCKED);
          IF cardinality(w_got) < v_l THEN
            w_got := w_got || ARRAY(
              SELECT st.subtask_id FROM edm.subtasks st
              WHERE st.task_id = w_task[j] AND st.status = 'pending'
                AND st.not_before = '-infinity'
                AND st.subtask_id <> ALL (c_sub)
              ORDER BY st.not_before, st.subtask_id
              LIMIT v_l - cardinality(w_got)
              FOR UPDATE OF st SKIP LOCKED);
          END IF;
          w_off := w_off || cardinality(w_sub);
          w_n := w_n || cardinality(w_got);
          w_sub := w_sub || w_got;
          IF cardinality(w_got) = v_l
             AND (v_cut IS NULL OR ARRAY[w_lvl[j], v_l + 1, j] < v_cut) THEN
            v_cut := ARRAY[w_lvl[j], v_l + 1, j];
          END IF;
        END LOOP;
        -- Dealt in the loop's order: level by level, a round at a time, one
        -- recipient of each task with one left; up to the first slot not known.
        i := 0;
        <<deal>>
        FOR v_lvl_i IN 1 .. coalesce(w_lvl[cardinality(w_lvl)], 0) LOOP
          FOR v_rn IN 1 .. v_l LOOP
            FOR j IN 1 .. cardinality(w_task) LOOP
              CONTINUE WHEN w_lvl[j] <> v_lvl_i OR w_n[j] < v_rn;
              EXIT deal WHEN v_cut IS NOT NULL AND ARRAY[v_lvl_i, v_rn, j] >= v_cut;
              EXIT deal WHEN i >= v_want;
              i := i + 1;
              c_svc := c_svc || v_svc.service_id;
              c_sub := c_sub || w_sub[w_off[j] + v_rn];
              c_task := c_task || w_task[j];
              c_user := c_user || v_user;
              c_slot := c_slot || v_slot;
              r_users := array_remove(r_users, v_user) || v_user;
              r_tasks := array_remove(r_tasks, w_task[j]) || w_task[j];
              v_k := v_k + 1;
              v_slot := v_slot + v_svc.interval_ms * interval '1 millisecond';
            END LOOP;
          END LOOP;
        END LOOP deal;
      END IF;
      CONTINUE slots;
    END IF;
    v_sub := NULL;
    IF v_svc.has_limits THEN
      v_slot := edm.limits_next(v_svc.service_id, v_slot, v_svc.quota_tz);
    END IF;
    IF v_slot > v_horizon THEN
      IF v_k = 0 THEN  -- an extra limit blocks the service beyond the horizon
        b_svc := b_svc || v_svc.service_id;
        b_until := b_until || v_slot;
      END IF;
      EXIT slots;
    END IF;
    EXIT slots WHEN v_svc.sent_today + v_k >= v_svc.daily_quota;
    -- The global limit delays the slot; past the horizon (or held by another
    -- claim) it ends this claim.
    IF v_global THEN
      v_keys := ARRAY[edm.shaping_key('global', NULL, NULL, NULL, NULL)];
      IF NOT v_keys <@ m_seen THEN
        SELECT x.keys, x.lims, x.held INTO v_nk, v_nl, v_nh
        FROM edm.shaping_load(ARRAY(SELECT k FROM unnest(v_keys) k WHERE k <> ALL (m_seen))) x;
        m_keys := m_keys || coalesce(v_nk, '{}');
        m_lims := m_lims || coalesce(v_nl, '{}');
        m_dirty := m_dirty || array_fill(false, ARRAY[coalesce(cardinality(v_nk), 0)]);
        m_held := m_held || coalesce(v_nh, '{}');
        m_seen := m_seen || v_keys;
      END IF;
      v_free := CASE WHEN v_keys && m_keys OR v_keys && m_held
                    THEN edm.shaping_free(v_keys, m_keys, m_lims, m_held, v_slot) ELSE v_slot END;
      IF v_free > v_horizon THEN
        v_stop := true;
        EXIT slots;
      END IF;
      v_slot := v_free;
    END IF;
    -- Users found without work at this slot only (site or user limits, which
    -- free later or on another service) are skipped for this slot alone.
    v_skip := v_skip_call;
    v_blocked := v_susp;
    v_bdom := v_sdom;
    v_ok_sites := '{}';
    v_tx_tried := '{}';
    -- (once the lane found nothing for this service, it finds nothing at its
    -- next slots either: the query is not repeated)
    v_tx_slot := v_tx AND v_tx_here AND v_tx_run < v_tx_max;
    LOOP
      v_user := NULL;
      v_fixed := NULL;
      -- Transactional lane (0016): the least recently served transactional
      -- task whose user may use this service, ahead of the rotation, while
      -- the service's run of such slots stays within the share.
      IF v_tx_slot THEN
        SELECT t.task_id, t.user_id INTO v_fixed, v_user
        FROM edm.tasks t
        WHERE t.transactional AND t.claimable
          AND t.task_id <> ALL (v_tx_tried) AND t.user_id <> ALL (v_skip)
          AND (
            SELECT true FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = t.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = t.user_id AND g2.priority > g.priority
                  AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id))
            LIMIT 1)
        ORDER BY t.last_served_seq, t.task_id
        LIMIT 1
        FOR UPDATE OF t SKIP LOCKED;
        v_tx_slot := v_fixed IS NOT NULL;
        IF v_fixed IS NULL AND cardinality(v_tx_tried) = 0 THEN
          -- no transactional work for this service: its next slots may be filled
          v_tx_here := false;
          v_fill := NOT v_fill_used AND NOT v_svc.has_limits;
        END IF;
        IF v_fixed IS NOT NULL THEN
          -- its user's row guards the user's limits and rotation
          PERFORM 1 FROM edm.users u WHERE u.user_id = v_user FOR UPDATE OF u SKIP LOCKED;
          IF NOT FOUND THEN
            v_tx_tried := v_tx_tried || v_fixed;
            CONTINUE;
          END IF;
        END IF;
      END IF;
      IF v_user IS NULL THEN
      -- The first user of the list (the small pool in rotation order, or the
      -- rotation head, already locked) who has a grant here and no ready
      -- higher-tier service, each probed by a scalar subquery.
      -- (0030: of a small pool, its users not served in the call: read once
      -- a service, each served in the loop then taken out)
      IF v_pool IS NOT NULL AND v_left IS NULL THEN
        v_left := ARRAY(SELECT x.user_id FROM unnest(v_pool) WITH ORDINALITY AS x(user_id, n)
                        WHERE x.user_id <> ALL (r_users) ORDER BY x.n);
      END IF;
      SELECT c.user_id INTO v_user
      FROM unnest(coalesce(v_left, v_cands[v_from:])) WITH ORDINALITY AS c(user_id, n)
      WHERE c.user_id <> ALL (v_skip) AND c.user_id <> ALL (r_users)
        AND (
          SELECT true FROM edm.grants g
          WHERE g.service_id = v_svc.service_id AND g.user_id = c.user_id
            AND NOT EXISTS (
              SELECT 1 FROM edm.grants g2
              WHERE g2.user_id = c.user_id AND g2.priority > g.priority
                AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                     FROM edm.services s2 WHERE s2.service_id = g2.service_id))
          LIMIT 1)
      ORDER BY c.n
      LIMIT 1;
      IF v_user IS NOT NULL AND v_pool IS NOT NULL THEN
        -- A pool's users are not locked yet; one locked by another claim is
        -- being served: leave it out and look again.
        PERFORM 1 FROM edm.users u
        WHERE u.user_id = v_user AND u.claimable_tasks > 0
        FOR UPDATE OF u SKIP LOCKED;
        IF NOT FOUND THEN
          v_skip := v_skip || v_user;
          v_skip_call := v_skip_call || v_user;
          CONTINUE;
        END IF;
      END IF;
      -- Large pool and nobody in the head fits: walk the rotation further.
      IF v_user IS NULL AND v_pool IS NULL THEN
        SELECT u.user_id INTO v_user
        FROM edm.users u
        WHERE u.claimable_tasks > 0
          AND u.user_id <> ALL (v_cands)
          AND u.user_id <> ALL (v_skip)
          AND u.user_id <> ALL (r_users)
          AND EXISTS (
            SELECT 1 FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = u.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = u.user_id AND g2.priority > g.priority
                  AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id)))
        ORDER BY u.last_served_seq, u.user_id
        LIMIT 1
        FOR UPDATE OF u SKIP LOCKED;
      END IF;
      -- ...then (the rotation wraps around) those served in this call, in serve order.
      IF v_user IS NULL AND cardinality(r_users) > 0 THEN
        -- (0030: walked in serve order up to the first that fits, a grant
        -- probed only for it and those before it; of a small pool, only
        -- its users)
        SELECT c.user_id INTO v_user
        FROM unnest(r_users) WITH ORDINALITY AS c(user_id, n)
        WHERE (v_pool IS NULL OR c.user_id = ANY (v_pool)) AND c.user_id <> ALL (v_skip)
          AND EXISTS (
            SELECT 1 FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = c.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = c.user_id AND g2.priority > g.priority
                  AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id)))
        ORDER BY c.n
        LIMIT 1;
      END IF;
      END IF;
      EXIT WHEN v_user IS NULL;

      -- User limits (0016): a user without headroom at the slot is skipped.
      IF v_user_lim THEN
        v_keys := ARRAY[edm.shaping_key('user', NULL, NULL, v_user, NULL)];
        -- (the user's row, locked by this call, tells whether it has limits:
        -- its flag changes only under that lock)
        IF NOT v_keys <@ m_seen THEN
          IF NOT coalesce((SELECT u.has_limits FROM edm.users u WHERE u.user_id = v_user), true) THEN
            m_seen := m_seen || v_keys;
          END IF;
        END IF;
        IF NOT v_keys <@ m_seen THEN
          SELECT x.keys, x.lims, x.held INTO v_nk, v_nl, v_nh
          FROM edm.shaping_load(ARRAY(SELECT k FROM unnest(v_keys) k WHERE k <> ALL (m_seen))) x;
          m_keys := m_keys || coalesce(v_nk, '{}');
          m_lims := m_lims || coalesce(v_nl, '{}');
          m_dirty := m_dirty || array_fill(false, ARRAY[coalesce(cardinality(v_nk), 0)]);
          m_held := m_held || coalesce(v_nh, '{}');
          m_seen := m_seen || v_keys;
        END IF;
        v_free := CASE WHEN v_keys && m_keys OR v_keys && m_held
                    THEN edm.shaping_free(v_keys, m_keys, m_lims, m_held, v_slot) ELSE v_slot END;
        IF v_free > v_slot THEN
          IF v_fixed IS NOT NULL THEN
            v_tx_tried := v_tx_tried || v_fixed;
          END IF;
          v_skip := v_skip || v_user;
          CONTINUE;
        END IF;
      END IF;

      v_tried := '{}';
      LOOP
        v_task := NULL;
        IF v_fixed IS NOT NULL THEN
          -- the transactional task, once
          IF NOT v_fixed = ANY (v_tried) THEN
            v_task := v_fixed;
          END IF;
        ELSE
        -- The user's best task not served in this call (priority, then rotation)...
        SELECT t.task_id, t.priority INTO v_task, v_prio FROM edm.tasks t
        WHERE t.user_id = v_user AND t.claimable
          AND t.task_id <> ALL (v_tried) AND t.task_id <> ALL (r_tasks)
          AND t.task_id <> ALL (v_empty)
        ORDER BY t.priority DESC, t.last_served_seq, t.task_id
        LIMIT 1
        FOR UPDATE OF t SKIP LOCKED;
        -- ...unless a task served in this call has a higher priority (or there is no other).
        IF c_user @> ARRAY[v_user] THEN
          SELECT t.task_id INTO v_task2 FROM edm.tasks t
          WHERE t.task_id = ANY (r_tasks) AND t.user_id = v_user AND t.claimable
            AND t.task_id <> ALL (v_tried) AND t.task_id <> ALL (v_empty)
            AND (v_task IS NULL OR t.priority > v_prio)
          ORDER BY t.priority DESC, array_position(r_tasks, t.task_id)
          LIMIT 1;
          v_task := coalesce(v_task2, v_task);
        END IF;
        END IF;
        EXIT WHEN v_task IS NULL;
        -- Task limits (0016): a task without headroom at the slot is skipped.
        IF v_task_lim THEN
          v_keys := ARRAY[edm.shaping_key('task', NULL, NULL, NULL, v_task)];
          -- (as for the user: the task's row is locked by this call)
          IF NOT v_keys <@ m_seen THEN
            IF NOT coalesce((SELECT t.has_limits FROM edm.tasks t WHERE t.task_id = v_task), true) THEN
              m_seen := m_seen || v_keys;
            END IF;
          END IF;
          IF NOT v_keys <@ m_seen THEN
            SELECT x.keys, x.lims, x.held INTO v_nk, v_nl, v_nh
            FROM edm.shaping_load(ARRAY(SELECT k FROM unnest(v_keys) k WHERE k <> ALL (m_seen))) x;
            m_keys := m_keys || coalesce(v_nk, '{}');
            m_lims := m_lims || coalesce(v_nl, '{}');
            m_dirty := m_dirty || array_fill(false, ARRAY[coalesce(cardinality(v_nk), 0)]);
            m_held := m_held || coalesce(v_nh, '{}');
            m_seen := m_seen || v_keys;
          END IF;
          v_free := CASE WHEN v_keys && m_keys OR v_keys && m_held
                    THEN edm.shaping_free(v_keys, m_keys, m_lims, m_held, v_slot) ELSE v_slot END;
          IF v_free > v_slot THEN
            v_tried := v_tried || v_task;
            CONTINUE;
          END IF;
        END IF;
        -- Due retries first (I9), then the lowest fresh or returned recipient,
        -- leaving out recipients of the sites this slot may not go to (0016:
        -- suspended for the service, or found without headroom): the slot
        -- goes to the next recipient of another site (no head-of-line blocking).
        LOOP
          IF cardinality(v_bdom) = 0 THEN
            SELECT st.subtask_id, st.domain INTO v_sub, v_dom
            FROM edm.subtasks st
            WHERE st.task_id = v_task AND st.status = 'pending'
              AND st.not_before > '-infinity' AND st.not_before <= v_now
              AND st.subtask_id <> ALL (c_sub)
            ORDER BY st.not_before, st.subtask_id
            LIMIT 1
            FOR UPDATE OF st SKIP LOCKED;
            IF v_sub IS NULL THEN
              SELECT st.subtask_id, st.domain INTO v_sub, v_dom
              FROM edm.subtasks st
              WHERE st.task_id = v_task AND st.status = 'pending' AND st.not_before = '-infinity'
                AND st.subtask_id <> ALL (c_sub)
              ORDER BY st.not_before, st.subtask_id
              LIMIT 1
              FOR UPDATE OF st SKIP LOCKED;
            END IF;
          ELSE
            -- both lookups, skipping the blocked sites' domains without
            -- walking their recipients (0022)
            SELECT x.subtask_id, x.domain INTO v_sub, v_dom
            FROM edm.claim_next_subtask(v_task, v_now, c_sub, v_bdom) x;
          END IF;
          v_site := NULL;
          IF v_sub IS NOT NULL AND cardinality(v_lsites) > 0 THEN
            v_site := v_ldom_sites[array_position(v_ldoms, v_dom)];
          END IF;
          EXIT WHEN v_sub IS NULL OR cardinality(v_lsites) = 0;
          -- Site and (service, site) limits of the recipient's site at the slot.
          EXIT WHEN v_site IS NULL OR NOT v_site = ANY (v_lsites) OR v_site = ANY (v_ok_sites);
          v_keys := ARRAY[edm.shaping_key('site', v_site, NULL, NULL, NULL)];
          IF v_svc.own_site_rules THEN
            v_keys := v_keys || edm.shaping_key('service_site', v_site, v_svc.service_id, NULL, NULL);
          END IF;
          IF NOT v_keys <@ m_seen THEN
            SELECT x.keys, x.lims, x.held INTO v_nk, v_nl, v_nh
            FROM edm.shaping_load(ARRAY(SELECT k FROM unnest(v_keys) k WHERE k <> ALL (m_seen))) x;
            m_keys := m_keys || coalesce(v_nk, '{}');
            m_lims := m_lims || coalesce(v_nl, '{}');
            m_dirty := m_dirty || array_fill(false, ARRAY[coalesce(cardinality(v_nk), 0)]);
            m_held := m_held || coalesce(v_nh, '{}');
            m_seen := m_seen || v_keys;
          END IF;
          v_free := CASE WHEN v_keys && m_keys OR v_keys && m_held
                    THEN edm.shaping_free(v_keys, m_keys, m_lims, m_held, v_slot) ELSE v_slot END;
          IF v_free > v_slot THEN
            v_blocked := v_blocked || v_site;
            v_bdom := v_bdom || ARRAY(SELECT sd.domain FROM edm.site_domains sd
                                      WHERE sd.site = v_site);
            v_sub := NULL;
          ELSE
            v_ok_sites := v_ok_sites || v_site;
            EXIT;
          END IF;
        END LOOP;
        EXIT WHEN v_sub IS NOT NULL;
        v_tried := v_tried || v_task;
      END LOOP;
      EXIT WHEN v_sub IS NOT NULL;
      IF v_fixed IS NOT NULL THEN
        v_tx_tried := v_tx_tried || v_fixed;
      ELSE
        v_skip := v_skip || v_user;
        IF NOT v_shaped THEN
          v_skip_call := v_skip_call || v_user;
        END IF;
      END IF;
    END LOOP;
    EXIT slots WHEN v_sub IS NULL;

    c_svc := c_svc || v_svc.service_id;
    c_sub := c_sub || v_sub;
    c_task := c_task || v_task;
    c_user := c_user || v_user;
    c_slot := c_slot || v_slot;
    r_users := array_remove(r_users, v_user) || v_user;
    r_tasks := array_remove(r_tasks, v_task) || v_task;
    v_left := array_remove(v_left, v_user);
    IF v_svc.has_limits THEN
      PERFORM edm.limits_take(v_svc.service_id, v_slot, v_svc.quota_tz);
    END IF;
    -- Every shaping layer counts the send (0016).
    IF v_shaped THEN
      v_keys := '{}';
      IF v_global THEN
        v_keys := v_keys || edm.shaping_key('global', NULL, NULL, NULL, NULL);
      END IF;
      IF v_site IS NOT NULL AND v_site = ANY (v_ok_sites) THEN
        v_keys := v_keys || edm.shaping_key('site', v_site, NULL, NULL, NULL);
        IF v_svc.own_site_rules THEN
          v_keys := v_keys || edm.shaping_key('service_site', v_site, v_svc.service_id, NULL, NULL);
        END IF;
      END IF;
      IF v_user_lim THEN
        v_keys := v_keys || edm.shaping_key('user', NULL, NULL, v_user, NULL);
      END IF;
      IF v_task_lim THEN
        v_keys := v_keys || edm.shaping_key('task', NULL, NULL, NULL, v_task);
      END IF;
      -- one send's transition (edm.limit_after), in memory
      FOREACH v_key IN ARRAY v_keys LOOP
        FOREACH j IN ARRAY array_positions(m_keys, v_key) LOOP
          m_lims[j] := edm.limit_after(m_lims[j], v_slot, 'UTC', v_margin);
          m_dirty[j] := true;
        END LOOP;
      END LOOP;
      v_tx_run := CASE WHEN v_fixed IS NOT NULL THEN v_tx_run + 1 ELSE 0 END;
      v_site := NULL;
    END IF;
    v_k := v_k + 1;
    EXIT slots WHEN v_k >= p_per_service OR cardinality(c_sub) >= p_batch;
    v_slot := v_slot + v_svc.interval_ms * interval '1 millisecond';
    END LOOP slots;
    IF v_tx AND v_tx_run IS DISTINCT FROM v_svc.tx_run THEN
      UPDATE edm.services s SET tx_run = v_tx_run WHERE s.service_id = v_svc.service_id;
    END IF;
    EXIT WHEN cardinality(c_sub) >= p_batch OR v_stop;
  END LOOP;
  EXIT ranked WHEN cardinality(c_sub) >= p_batch OR v_stop;
  CONTINUE ranked WHEN v_rest IS NOT NULL;  -- the next chunk
  EXIT ranked WHEN cardinality(v_order) < v_lim;
  v_lim := 2147483647;  -- the rest, in one ranking
  END LOOP ranked;
  -- The shaping limits' state after this call's sends (0016).
  IF true = ANY (m_dirty) THEN
    UPDATE edm.shaping_limits l
    SET (tat, bucket_idx, bucket_n, day, day_count) =
        ((m_lims[x.i]).tat, (m_lims[x.i]).bucket_idx, (m_lims[x.i]).bucket_n,
         (m_lims[x.i]).day, (m_lims[x.i]).day_count)
    FROM generate_subscripts(m_keys, 1) AS x(i)
    WHERE m_dirty[x.i] AND l.scope_key = m_keys[x.i] AND l.name = (m_lims[x.i]).name;
  END IF;

  -- Services an extra limit blocks: out of the ready set until it frees.
  IF cardinality(b_svc) > 0 THEN
    UPDATE edm.services s SET quota_exhausted_until = b.until
    FROM unnest(b_svc, b_until) AS b(service_id, until)
    WHERE s.service_id = b.service_id AND s.service_id = ANY (b_svc);
  END IF;

  IF cardinality(c_sub) = 0 THEN
    RETURN;
  END IF;

  -- One statement per table for the whole batch (each row is already locked).
  SELECT array_agg(nextval('edm.serve_seq') ORDER BY i) INTO v_seqs
  FROM generate_series(1, cardinality(c_sub)) i;

  -- Each claimed service: its latest slot starts the interval, its slots
  -- count against the daily quota, the claimer holds it, and the time an
  -- exhausted quota or extra limit next admits a send keeps it out of the
  -- ready set until then.
  UPDATE edm.services s
  SET last_sent_at = a.last_slot,
      sent_today = CASE WHEN s.quota_day = (v_now AT TIME ZONE s.quota_tz)::date
                        THEN s.sent_today + a.n ELSE a.n END,
      quota_day = (v_now AT TIME ZONE s.quota_tz)::date,
      quota_exhausted_until =
        CASE WHEN (CASE WHEN s.quota_day = (v_now AT TIME ZONE s.quota_tz)::date
                        THEN s.sent_today + a.n ELSE a.n END) >= s.daily_quota
               THEN edm.service_next_quota_day(s.quota_tz, v_now)
             WHEN s.has_limits
               THEN nullif(edm.limits_next(s.service_id, a.last_slot, s.quota_tz), a.last_slot) END,
      -- a service with nothing to pace (no interval, no extra limit) is not held
      held_by = CASE WHEN s.interval_ms > 0 OR s.has_limits THEN p_owner END,
      held_until = CASE WHEN s.interval_ms > 0 OR s.has_limits THEN a.last_slot + v_hold END
  FROM (SELECT x.service_id, count(*)::integer AS n, max(x.slot) AS last_slot
        FROM unnest(c_svc, c_slot) AS x(service_id, slot) GROUP BY x.service_id) a
  WHERE s.service_id = a.service_id
    AND s.service_id = ANY (c_svc);  -- redundant: lets every plan start from services_pkey

  UPDATE edm.tasks t
  SET pending_count = t.pending_count - a.n,
      leased_count = t.leased_count + a.n,
      last_served_seq = a.seq,
      last_activity_at = v_now,
      first_claimed_at = coalesce(t.first_claimed_at, v_now),
      stuck_since = NULL
  FROM (SELECT x.task_id, count(*) AS n, max(x.seq) AS seq
        FROM unnest(c_task, v_seqs) AS x(task_id, seq) GROUP BY x.task_id) a
  WHERE t.task_id = a.task_id
    AND t.task_id = ANY (c_task);  -- redundant: lets every plan start from tasks_pkey

  UPDATE edm.users u SET last_served_seq = a.seq, last_served_at = v_now
  FROM (SELECT x.user_id, max(x.seq) AS seq
        FROM unnest(c_user, v_seqs) AS x(user_id, seq) GROUP BY x.user_id) a
  WHERE u.user_id = a.user_id
    AND u.user_id = ANY (c_user);  -- redundant: lets every plan start from users_pkey

  -- Rows in claim order (the order of the services), as the row-by-row version returned them.
  RETURN QUERY
  WITH leased AS (
    UPDATE edm.subtasks st
    SET status = 'leased', lease_owner = p_owner, leased_at = x.slot,
        lease_expires_at = x.slot + v_lease, service_id = x.service_id,
        attempts = st.attempts + 1
    FROM unnest(c_sub, c_svc, c_user, c_slot) AS x(subtask_id, service_id, user_id, slot)
    WHERE st.subtask_id = x.subtask_id
    RETURNING st.subtask_id, st.task_id, x.user_id, st.service_id, st.email, st.contact_id,
              st.template_idx, st.vars, st.attempts, st.leased_at, st.lease_expires_at
  )
  SELECT l.subtask_id, l.task_id, l.user_id, l.service_id, l.email, l.contact_id,
         l.template_idx, l.vars, l.attempts, l.leased_at, l.lease_expires_at
  FROM leased l JOIN unnest(c_sub) WITH ORDINALITY AS o(id, n) ON o.id = l.subtask_id
  ORDER BY o.n;
END;
$function$;
COMMENT ON FUNCTION edm.claim_v2(text,integer,integer,timestamp with time zone,integer,integer,bigint[]) IS 'Claims up to p_batch subtasks in one transaction and hands each its slot (send_at: the instant its send may start). For each ready service (next slot within p_lookahead_ms, default queue.slot_lookahead_ms; under its daily quota and every extra limit; not held by another dispatcher; not in p_skip_services), lowest quota share first: up to p_per_service slots, one interval apart and within every limit, each to transactional work first (tasks.transactional, within queue.transactional_share of the service''s slots) or else the least recently served user with work and a grant, that user''s least recently served task (priority first), and its due retry or else its lowest pending subtask. Every shaping layer (edm.shaping_limits) holds at once: a recipient whose site is suspended for the service or without headroom is skipped for another, a user or task without headroom is skipped, the global limit delays the slot or ends the claim. Leases each from its slot for p_lease_seconds, counts the slots against the limits and holds the service for the claimer. Never waits on a lock (a shared limit locked by another claim counts as no headroom).';
REVOKE ALL ON FUNCTION edm.claim_v2(text,integer,integer,timestamp with time zone,integer,integer,bigint[]) FROM PUBLIC;

CREATE FUNCTION edm.claim(p_owner text, p_batch integer DEFAULT 1, p_lease_seconds integer DEFAULT NULL::integer, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(subtask_id bigint, task_id bigint, user_id text, service_id bigint, email text, contact_id bigint, template_idx smallint, vars jsonb, attempt smallint, leased_at timestamp with time zone, lease_expires_at timestamp with time zone)
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
BEGIN ATOMIC
 SELECT c.subtask_id,
     c.task_id,
     c.user_id,
     c.service_id,
     c.email,
     c.contact_id,
     c.template_idx,
     c.vars,
     c.attempt,
     c.send_at,
     c.lease_expires_at
    FROM edm.claim_v2(claim.p_owner, claim.p_batch, claim.p_lease_seconds, claim.p_now, 1, 0, '{}'::bigint[]) c(subtask_id, task_id, user_id, service_id, email, contact_id, template_idx, vars, attempt, send_at, lease_expires_at);
END;
COMMENT ON FUNCTION edm.claim(text,integer,integer,timestamp with time zone) IS 'The claim of dispatchers before slots (kept for rolling upgrades and host loops): edm.claim_v2 with one slot per service and no lookahead, so every slot is now. Limits, holds and due-retries-first apply as in claim_v2.';
REVOKE ALL ON FUNCTION edm.claim(text,integer,integer,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.claim_next_subtask(p_task_id bigint, p_now timestamp with time zone, p_exclude bigint[], p_skip_domains text[], OUT subtask_id bigint, OUT domain text)
 RETURNS record
 LANGUAGE plpgsql
 STRICT SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_pass integer;
  v_lo   timestamptz;
  v_hi   timestamptz;
  v_nb   timestamptz;
  v_id   bigint;
  v_short boolean;
BEGIN
  -- Pass 1: due retries (a finite not_before up to p_now); pass 2: fresh or
  -- returned recipients (not_before -infinity). Each: the lowest in claim
  -- order whose domain is not in p_skip_domains, locked (SKIP LOCKED).
  FOR v_pass IN 1 .. 2 LOOP
    IF v_pass = 1 THEN
      v_lo := '4714-11-24 00:00:00+00 BC';  -- the first finite timestamptz
      v_hi := p_now;
    ELSE
      v_lo := '-infinity';
      v_hi := '-infinity';
    END IF;
    -- The probe: the key of the 64th recipient in claim order.
    SELECT st.not_before, st.subtask_id INTO v_nb, v_id
    FROM edm.subtasks st
    WHERE st.task_id = p_task_id AND st.status = 'pending'
      AND st.not_before >= v_lo AND st.not_before <= v_hi
      AND st.subtask_id <> ALL (p_exclude)
    ORDER BY st.not_before, st.subtask_id
    OFFSET 63 LIMIT 1;
    v_short := v_nb IS NULL;
    IF v_short THEN
      -- fewer than 64: a short walk, to the end of the range
      v_nb := v_hi;
      v_id := 9223372036854775807;
    END IF;
    -- (each bound written once: a range's end given twice, by not_before <= and by
    -- the row comparison, can leave the index scan without its end key)
    SELECT st.subtask_id, st.domain INTO subtask_id, domain
    FROM edm.subtasks st
    WHERE st.task_id = p_task_id AND st.status = 'pending'
      AND st.not_before >= v_lo
      AND (st.not_before, st.subtask_id) <= (v_nb, v_id)
      AND st.subtask_id <> ALL (p_exclude)
      AND st.domain <> ALL (p_skip_domains)
    ORDER BY st.not_before, st.subtask_id
    LIMIT 1
    FOR UPDATE OF st SKIP LOCKED;
    IF subtask_id IS NOT NULL THEN
      RETURN;
    END IF;
    IF NOT v_short THEN
      -- The first 64 are all skipped: the first recipient after them of
      -- each domain not skipped (one index probe per domain of the task),
      -- and the lowest of those.
      SELECT f.not_before, f.subtask_id INTO v_nb, v_id
      FROM (
        WITH RECURSIVE d(domain) AS (
          SELECT (SELECT min(s.domain) FROM edm.subtasks s
                  WHERE s.task_id = p_task_id AND s.status = 'pending')
          UNION ALL
          SELECT (SELECT min(s.domain) FROM edm.subtasks s
                  WHERE s.task_id = p_task_id AND s.status = 'pending' AND s.domain > d.domain)
          FROM d WHERE d.domain IS NOT NULL)
        SELECT d.domain FROM d WHERE d.domain IS NOT NULL) dd
      CROSS JOIN LATERAL (
        SELECT s.not_before, s.subtask_id FROM edm.subtasks s
        WHERE s.task_id = p_task_id AND s.status = 'pending' AND s.domain = dd.domain
          AND (s.not_before, s.subtask_id) > (v_nb, v_id) AND s.not_before <= v_hi
          AND s.subtask_id <> ALL (p_exclude)
        ORDER BY s.not_before, s.subtask_id
        LIMIT 1) f
      WHERE dd.domain <> ALL (p_skip_domains)
      ORDER BY f.not_before, f.subtask_id
      LIMIT 1;
      IF FOUND THEN
        SELECT st.subtask_id, st.domain INTO subtask_id, domain
        FROM edm.subtasks st
        WHERE st.task_id = p_task_id AND st.status = 'pending'
          AND (st.not_before, st.subtask_id) >= (v_nb, v_id) AND st.not_before <= v_hi
          AND st.subtask_id <> ALL (p_exclude)
          AND st.domain <> ALL (p_skip_domains)
        ORDER BY st.not_before, st.subtask_id
        LIMIT 1
        FOR UPDATE OF st SKIP LOCKED;
        IF subtask_id IS NOT NULL THEN
          RETURN;
        END IF;
      END IF;
    END IF;
  END LOOP;
END;
$function$;
COMMENT ON FUNCTION edm.claim_next_subtask(bigint,timestamp with time zone,bigint[],text[]) IS 'For the claim: task p_task_id''s next recipient (its due retry, else its lowest fresh or returned one, not in p_exclude, claim order) whose domain is not in p_skip_domains (the domains of the sites the slot may not go to), locked FOR UPDATE SKIP LOCKED; NULLs when none (and when an argument is NULL: strict). Looks at the first 64 recipients in claim order, and past them jumps from domain to domain on subtasks_domain_idx, so a blocked site''s recipients cost one index probe per domain of the task, not one row each.';
REVOKE ALL ON FUNCTION edm.claim_next_subtask(bigint,timestamp with time zone,bigint[],text[]) FROM PUBLIC;

CREATE FUNCTION edm.task_sendable_outside(p_task_id bigint, p_now timestamp with time zone, p_skip_domains text[])
 RETURNS boolean
 LANGUAGE plpgsql
 STABLE STRICT
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
DECLARE
  v_dom text;
  v_nb  timestamptz;
  i     integer;
BEGIN
  -- The task's pending recipients' domains in order, each with its earliest
  -- recipient: one probe of subtasks_domain_idx per domain (the order by
  -- domain, then not_before, is that index's and no other's), until one not
  -- skipped has a recipient due.
  SELECT s.domain, s.not_before INTO v_dom, v_nb FROM edm.subtasks s
  WHERE s.task_id = p_task_id AND s.status = 'pending'
  ORDER BY s.domain, s.not_before
  LIMIT 1;
  FOR i IN 1 .. 32 LOOP
    IF v_dom IS NULL THEN
      RETURN false;
    END IF;
    IF v_dom <> ALL (p_skip_domains) AND v_nb <= p_now THEN
      RETURN true;
    END IF;
    SELECT s.domain, s.not_before INTO v_dom, v_nb FROM edm.subtasks s
    WHERE s.task_id = p_task_id AND s.status = 'pending' AND s.domain > v_dom
    ORDER BY s.domain, s.not_before
    LIMIT 1;
  END LOOP;
  RETURN true;  -- (32 domains without one: not worth looking further, say yes)
END;
$function$;
COMMENT ON FUNCTION edm.task_sendable_outside(bigint,timestamp with time zone,text[]) IS 'For the claim: false only when task p_task_id has no pending recipient due at p_now (fresh, returned or a due retry) outside the domains p_skip_domains. Walks the task''s pending domains on subtasks_domain_idx, at most 32, and answers true past them (true may be wrong, false never is).';
REVOKE ALL ON FUNCTION edm.task_sendable_outside(bigint,timestamp with time zone,text[]) FROM PUBLIC;

CREATE FUNCTION edm.subtask_next_status(p_outcome text, p_task_status text, p_attempts integer, p_max_attempts integer)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN (p_outcome = 'sent'::text) THEN 'sent'::text WHEN (p_outcome = ANY (ARRAY['permanent'::text, 'render_error'::text])) THEN 'failed'::text WHEN (p_outcome = ANY (ARRAY['transient'::text, 'retry'::text, 'uncertain'::text])) THEN CASE WHEN (p_attempts >= p_max_attempts) THEN 'failed'::text WHEN (p_task_status = 'cancelled'::text) THEN 'cancelled'::text ELSE 'pending'::text END WHEN (p_outcome = 'lease_expired'::text) THEN CASE WHEN (p_task_status = 'cancelled'::text) THEN 'cancelled'::text WHEN (p_attempts >= p_max_attempts) THEN 'failed'::text ELSE 'pending'::text END ELSE CASE WHEN (p_task_status = 'cancelled'::text) THEN 'cancelled'::text ELSE 'pending'::text END END;
COMMENT ON FUNCTION edm.subtask_next_status(text,text,integer,integer) IS 'The rule of a subtask''s next status, in one place: after outcome p_outcome (an outcome or effective outcome of edm.complete, or lease_expired for edm.expire_leases) of attempt p_attempts of p_max_attempts (queue.max_attempts), in a task of status p_task_status. sent; permanent and render_error fail; transient, retry and uncertain are retried (pending) until the last allowed attempt, then failed, and end cancelled when the task was cancelled; a lease that ran out ends cancelled when the task was, else like transient; anything else returns to pending, or cancelled with its task.';
REVOKE ALL ON FUNCTION edm.subtask_next_status(text,text,integer,integer) FROM PUBLIC;

CREATE FUNCTION edm.complete(p_owner text, p_subtask_ids bigint[], p_outcomes text[], p_codes integer[] DEFAULT NULL::integer[], p_details text[] DEFAULT NULL::text[], p_response_ms integer[] DEFAULT NULL::integer[], p_provider_ids text[] DEFAULT NULL::text[], p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(subtask_id bigint, accepted boolean, status text, reason text)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_now  timestamptz := coalesce(p_now, now());
  v_n    integer := cardinality(p_subtask_ids);
  v_max_attempts integer := edm.config_int('queue.max_attempts');
  v_retry_base   integer := edm.config_int('queue.pending_retry_interval');
  v_retry_max    integer := edm.config_int('queue.retry_backoff_max');
  v_svc_base     integer := edm.config_int('service.backoff_base');
  v_svc_max      integer := edm.config_int('service.backoff_max');
  v_rule_ids     bigint[];
  v_sites        text[];
  -- 0028: the services and tasks of the batch's leased subtasks, and the
  -- owners of those tasks that are cancelled
  v_svc_ids      bigint[];
  v_task_ids     bigint[];
  v_refund_users text[];
BEGIN
  IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'complete: owner must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF v_n IS NULL OR v_n = 0 THEN
    RETURN;
  END IF;
  IF v_n > 10000
     OR cardinality(p_outcomes) IS DISTINCT FROM v_n
     OR (p_codes IS NOT NULL AND cardinality(p_codes) <> v_n)
     OR (p_details IS NOT NULL AND cardinality(p_details) <> v_n)
     OR (p_response_ms IS NOT NULL AND cardinality(p_response_ms) <> v_n)
     OR (p_provider_ids IS NOT NULL AND cardinality(p_provider_ids) <> v_n) THEN
    RAISE EXCEPTION 'complete: argument arrays must all have the same length (at most 10000)'
      USING ERRCODE = 'ED005';
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(p_outcomes) o
             WHERE o IS NULL OR o NOT IN ('sent', 'transient', 'permanent', 'service', 'released',
                                          'uncertain', 'render_error')) THEN
    RAISE EXCEPTION 'complete: outcome must be sent, transient, permanent, service, released, uncertain or render_error'
      USING ERRCODE = 'ED005';
  END IF;
  IF (SELECT count(DISTINCT i) FROM unnest(p_subtask_ids) i) <> v_n
     OR array_position(p_subtask_ids, NULL) IS NOT NULL THEN
    RAISE EXCEPTION 'complete: subtask ids must be distinct and not null' USING ERRCODE = 'ED005';
  END IF;

  -- Lock in the global order: subtasks, services, tasks (see the header).
  -- (0028: each lock reads, from the rows it locks, which rows the next one
  -- locks; a row locked is read in its latest version)
  SELECT coalesce(array_agg(DISTINCT x.service_id) FILTER (WHERE x.status = 'leased'), '{}'),
         coalesce(array_agg(DISTINCT x.task_id) FILTER (WHERE x.status = 'leased'), '{}')
  INTO v_svc_ids, v_task_ids
  FROM (SELECT st.service_id, st.task_id, st.status FROM edm.subtasks st
        WHERE st.subtask_id = ANY (p_subtask_ids)
        ORDER BY st.subtask_id FOR NO KEY UPDATE) x;
  PERFORM 1 FROM edm.services s WHERE s.service_id = ANY (v_svc_ids)
  ORDER BY s.service_id FOR NO KEY UPDATE;
  -- Owners of cancelled tasks get the quota of subtasks that end cancelled
  -- back (refund_users below): lock them last, in id order.
  SELECT coalesce(array_agg(DISTINCT x.user_id) FILTER (WHERE x.status = 'cancelled'), '{}')
  INTO v_refund_users
  FROM (SELECT t.user_id, t.status FROM edm.tasks t WHERE t.task_id = ANY (v_task_ids)
        ORDER BY t.task_id FOR NO KEY UPDATE) x;
  IF cardinality(v_refund_users) > 0 THEN
    PERFORM 1 FROM edm.users u WHERE u.user_id = ANY (v_refund_users)
    ORDER BY u.user_id FOR NO KEY UPDATE;
  END IF;

  -- Reply rules (0017): only a failure that carries a reply can match, and a
  -- rule is looked up once per distinct (code, reply, site) of the batch. A
  -- batch without such a failure (the common case: sends) skips this.
  IF EXISTS (SELECT 1 FROM unnest(p_outcomes, coalesce(p_codes, array_fill(NULL::integer, ARRAY[v_n])),
                                  coalesce(p_details, array_fill(NULL::text, ARRAY[v_n]))) x(o, c, d)
             WHERE x.o IN ('transient', 'permanent', 'service') AND (x.c IS NOT NULL OR x.d IS NOT NULL))
     -- a rule could match one of the batch's distinct replies, whatever the
     -- recipient's site: only then are sites looked up
     -- (OFFSET 0 keeps the match above the DISTINCT: once per reply, not per row)
     AND EXISTS (SELECT 1
                 FROM (SELECT DISTINCT x.c, left(x.d, 2000) AS d
                       FROM unnest(p_outcomes, coalesce(p_codes, array_fill(NULL::integer, ARRAY[v_n])),
                                   coalesce(p_details, array_fill(NULL::text, ARRAY[v_n]))) x(o, c, d)
                       WHERE x.o IN ('transient', 'permanent', 'service')
                         AND (x.c IS NOT NULL OR x.d IS NOT NULL)
                       OFFSET 0) r
                 WHERE edm.match_reply_rule(r.c, r.d, NULL, true) IS NOT NULL) THEN
    WITH inp AS (
      SELECT x.n, x.outcome, x.code, left(x.detail, 2000) AS detail, st.email
      FROM unnest(p_subtask_ids, p_outcomes,
                  coalesce(p_codes, array_fill(NULL::integer, ARRAY[v_n])),
                  coalesce(p_details, array_fill(NULL::text, ARRAY[v_n])))
           WITH ORDINALITY AS x(subtask_id, outcome, code, detail, n)
      LEFT JOIN edm.subtasks st ON st.subtask_id = x.subtask_id
    ),
    elig AS (
      SELECT i.n, i.code, i.detail, edm.site_of(i.email) AS site
      FROM inp i
      WHERE i.outcome IN ('transient', 'permanent', 'service') AND i.email IS NOT NULL
        AND (i.code IS NOT NULL OR i.detail IS NOT NULL)
    ),
    matched AS (
      SELECT d.code, d.detail, d.site, edm.match_reply_rule(d.code, d.detail, d.site) AS rule_id
      FROM (SELECT DISTINCT e.code, e.detail, e.site FROM elig e) d
    )
    SELECT CASE WHEN count(m.rule_id) > 0 THEN array_agg(m.rule_id ORDER BY i.n) END,
           array_agg(e.site ORDER BY i.n)
    INTO v_rule_ids, v_sites
    FROM inp i
    LEFT JOIN elig e ON e.n = i.n
    LEFT JOIN matched m ON m.code IS NOT DISTINCT FROM e.code AND m.detail IS NOT DISTINCT FROM e.detail
                       AND m.site IS NOT DISTINCT FROM e.site;
  END IF;

  RETURN QUERY
  WITH input AS (
    SELECT i.subtask_id, i.outcome, i.code, left(i.detail, 2000) AS detail, i.response_ms,
           left(i.provider_id, 500) AS provider_id, i.rule_id, i.site
    FROM unnest(p_subtask_ids, p_outcomes,
                coalesce(p_codes, array_fill(NULL::integer, ARRAY[v_n])),
                coalesce(p_details, array_fill(NULL::text, ARRAY[v_n])),
                coalesce(p_response_ms, array_fill(NULL::integer, ARRAY[v_n])),
                coalesce(p_provider_ids, array_fill(NULL::text, ARRAY[v_n])),
                coalesce(v_rule_ids, array_fill(NULL::bigint, ARRAY[v_n])),
                coalesce(v_sites, array_fill(NULL::text, ARRAY[v_n])))
         AS i(subtask_id, outcome, code, detail, response_ms, provider_id, rule_id, site)
  ),
  -- What a matched rule turns the outcome into (eff): throttled (the
  -- (service, site) pair is suspended; for a recipient without a site, it is
  -- retried after the rule's duration), throttled_service (the service backs
  -- off for the rule's duration), permanent (bounce) or retry (after the
  -- rule's duration, spending the attempt). Without a rule: the outcome.
  ruled AS (
    SELECT i.*, r.name AS rule_name, r.action AS rule_action, r.duration_s, r.escalation_factor,
           r.max_duration_s, r.reset_after_s, r.priority AS rule_priority,
           CASE r.action WHEN 'suspend_site' THEN 'throttled'
                         WHEN 'suspend_service' THEN 'throttled_service'
                         WHEN 'bounce' THEN 'permanent'
                         WHEN 'retry' THEN 'retry'
                         ELSE i.outcome END AS eff
    FROM input i
    LEFT JOIN edm.reply_rules r ON r.rule_id = i.rule_id
  ),
  -- What each completion does. Only the lease holder, before expiry, may
  -- complete; anything else is rejected (and recorded when the subtask exists).
  plan AS (
    SELECT i.*, st.task_id, st.service_id, st.attempts, st.email, st.leased_at,
           st.status AS old_status, t.user_id, t.status AS task_status,
           (st.subtask_id IS NOT NULL AND st.status = 'leased' AND st.lease_owner = p_owner
            AND st.lease_expires_at > v_now) AS ok,
           CASE
             WHEN st.subtask_id IS NULL THEN 'unknown subtask'
             WHEN st.status <> 'leased' THEN 'subtask is ' || st.status || ', not leased'
             WHEN st.lease_owner <> p_owner THEN 'leased by another dispatcher'
             WHEN st.lease_expires_at <= v_now THEN 'lease expired at ' || st.lease_expires_at
           END AS reject_reason,
           edm.subtask_next_status(i.eff, t.status, st.attempts, v_max_attempts) AS new_status,
           -- service, released, render_error and throttled outcomes did not send: give the
           -- quota back when the claim counted it on the service's current quota day.
           (i.eff IN ('service', 'released', 'render_error', 'throttled', 'throttled_service')
            AND (st.leased_at AT TIME ZONE s.quota_tz)::date = s.quota_day) AS refund_quota
    FROM ruled i
    LEFT JOIN edm.subtasks st ON st.subtask_id = i.subtask_id
    LEFT JOIN edm.tasks t ON t.task_id = st.task_id
    LEFT JOIN edm.services s ON s.service_id = st.service_id
  ),
  -- The (service, site) pairs a suspend_site rule suspends: one per pair and
  -- batch (the rule tried first wins), escalated from the pair's last
  -- suspension. A pair still suspended keeps its suspension: the replies to
  -- sends already under way when it began are not repeats.
  pairs AS (
    SELECT q.service_id, q.site, q.rule_id, q.rule_name, q.code, q.detail,
           CASE WHEN x.until > v_now THEN x.level
                WHEN x.until + make_interval(secs => q.reset_after_s) > v_now
                  THEN least(x.level + 1, 1000)
                ELSE 1 END AS level,
           x.until AS old_until, x.level AS old_level, q.duration_s, q.escalation_factor,
           q.max_duration_s
    FROM (SELECT DISTINCT ON (p.service_id, p.site) p.*
          FROM plan p
          WHERE v_rule_ids IS NOT NULL AND p.ok AND p.eff = 'throttled' AND p.site IS NOT NULL
          ORDER BY p.service_id, p.site, p.rule_priority, p.rule_id, p.subtask_id) q
    LEFT JOIN edm.site_suspensions x ON x.service_id = q.service_id AND x.site = q.site
  ),
  new_pairs AS (
    SELECT pr.*,
           CASE WHEN pr.old_until > v_now THEN pr.old_until
                ELSE v_now + make_interval(secs => least(
                       coalesce(pr.max_duration_s, pr.duration_s)::double precision,
                       pr.duration_s * power(pr.escalation_factor, least(pr.level - 1, 60))))
           END AS until
    FROM pairs pr
  ),
  suspend AS (
    INSERT INTO edm.site_suspensions AS x (service_id, site, until, level, reason, created_at)
    SELECT np.service_id, np.site, np.until, np.level,
           left('reply rule ' || np.rule_name || ' (level ' || np.level || '): '
                || coalesce(np.detail, np.code::text, ''), 2000),
           v_now
    FROM new_pairs np
    WHERE np.old_until IS NULL OR np.old_until <= v_now
    ORDER BY np.service_id, np.site
    ON CONFLICT (service_id, site) DO UPDATE
      SET until = EXCLUDED.until, level = EXCLUDED.level, reason = EXCLUDED.reason,
          created_at = EXCLUDED.created_at
  ),
  upd_services AS (
    UPDATE edm.services s
    SET total_sent = s.total_sent + a.n_sent,
        total_failed = s.total_failed + a.n_failed,
        avg_response_ms = CASE WHEN a.avg_ms IS NULL THEN s.avg_response_ms
                               WHEN s.avg_response_ms IS NULL THEN a.avg_ms
                               ELSE s.avg_response_ms * 0.8 + a.avg_ms * 0.2 END,
        sent_today = greatest(s.sent_today - a.n_refund, 0),
        quota_exhausted_until = CASE WHEN a.n_refund > 0 THEN NULL ELSE s.quota_exhausted_until END,
        consecutive_failures = CASE WHEN a.n_service > 0 THEN s.consecutive_failures + a.n_service
                                    WHEN a.n_sent > 0 THEN 0 ELSE s.consecutive_failures END,
        backoff_until = greatest(
          CASE WHEN a.n_service > 0
            THEN v_now + make_interval(secs => least(v_svc_max::double precision,
                   v_svc_base * power(2, least(s.consecutive_failures + a.n_service - 1, 30))))
            ELSE s.backoff_until END,
          a.rule_backoff_until),
        health = CASE WHEN a.n_service > 0 OR a.rule_backoff_until > v_now THEN 'backoff'
                      WHEN a.n_sent > 0 AND a.n_failed = 0 THEN 'healthy'
                      WHEN a.n_failed > 0 THEN 'degraded'
                      ELSE s.health END,
        last_error = CASE WHEN a.n_service > 0 THEN a.last_service_error
                          WHEN a.rule_backoff_until IS NOT NULL THEN a.last_rule_error
                          ELSE s.last_error END
    FROM (
      SELECT p.service_id,
             count(*) FILTER (WHERE p.eff = 'sent') AS n_sent,
             count(*) FILTER (WHERE p.eff IN ('transient', 'permanent', 'uncertain')) AS n_failed,
             count(*) FILTER (WHERE p.eff = 'service') AS n_service,
             count(*) FILTER (WHERE p.refund_quota) AS n_refund,
             avg(p.response_ms) FILTER (WHERE p.eff = 'sent') AS avg_ms,
             max(p.detail) FILTER (WHERE p.eff = 'service') AS last_service_error,
             max(v_now + make_interval(secs => p.duration_s))
               FILTER (WHERE p.eff = 'throttled_service') AS rule_backoff_until,
             max(left('reply rule ' || p.rule_name || ': ' || coalesce(p.detail, p.code::text, ''),
                      2000))
               FILTER (WHERE p.eff = 'throttled_service') AS last_rule_error
      FROM plan p WHERE p.ok GROUP BY p.service_id
    ) a
    WHERE s.service_id = a.service_id
      AND s.service_id = ANY (v_svc_ids)  -- redundant: lets the plan start from services_pkey
    RETURNING s.service_id, s.backoff_until
  ),
  upd_tasks AS (
    UPDATE edm.tasks t
    SET leased_count = t.leased_count - a.n,
        sent_count = t.sent_count + a.n_sent,
        failed_count = t.failed_count + a.n_failed,
        pending_count = t.pending_count + a.n_pending,
        cancelled_count = t.cancelled_count + a.n_cancelled,
        quota_reserved = greatest(t.quota_reserved - a.n_sent - a.n_failed - a.n_cancelled, 0),
        last_activity_at = v_now,
        stuck_since = NULL
        -- a task this drains is completed by trigger tasks_when_drained (0019)
    FROM (
      SELECT p.task_id, count(*) AS n,
             count(*) FILTER (WHERE p.new_status = 'sent') AS n_sent,
             count(*) FILTER (WHERE p.new_status = 'failed') AS n_failed,
             count(*) FILTER (WHERE p.new_status = 'pending') AS n_pending,
             count(*) FILTER (WHERE p.new_status = 'cancelled') AS n_cancelled
      FROM plan p WHERE p.ok GROUP BY p.task_id
    ) a
    WHERE t.task_id = a.task_id
  ),
  -- A subtask that ends cancelled (its task was cancelled while it was
  -- leased) was never sent: its quota goes back to the user, as cancel_task
  -- does for the pending ones.
  refund_users AS (
    UPDATE edm.users u SET quota_used = u.quota_used - a.n
    FROM (SELECT p.user_id, count(*) AS n FROM plan p
          WHERE p.ok AND p.new_status = 'cancelled' GROUP BY p.user_id) a
    WHERE u.user_id = a.user_id
  ),
  upd_subtasks AS (
    UPDATE edm.subtasks st
    SET status = p.new_status,
        lease_owner = NULL,
        lease_expires_at = NULL,
        attempts = CASE WHEN p.eff IN ('service', 'released', 'render_error', 'throttled',
                                       'throttled_service')
                        THEN greatest(st.attempts - 1, 0) ELSE st.attempts END,
        uncertain_sends = st.uncertain_sends + CASE WHEN p.outcome = 'uncertain' THEN 1 ELSE 0 END,
        not_before = CASE
          WHEN p.new_status = 'pending' AND p.eff IN ('transient', 'uncertain')
            THEN v_now + make_interval(secs => least(v_retry_max::double precision,
                                                     v_retry_base * power(2, least(st.attempts - 1, 30))))
          -- a rule's retry, or a throttle for a recipient without a site
          WHEN p.new_status = 'pending' AND (p.eff = 'retry' OR (p.eff = 'throttled' AND p.site IS NULL))
            THEN v_now + make_interval(secs => p.duration_s)
          -- not sent (service failure, release, throttled pair): back to its
          -- place in line (the claim skips a suspended pair)
          WHEN p.new_status = 'pending' THEN '-infinity'
          ELSE st.not_before END,
        outcome_code = coalesce(p.code, st.outcome_code),
        outcome_detail = CASE WHEN p.new_status = 'failed' AND p.eff IN ('transient', 'uncertain', 'retry')
                              THEN 'gave up after ' || st.attempts || ' attempts: ' || coalesce(p.detail, '')
                              ELSE coalesce(p.detail, st.outcome_detail) END,
        provider_message_id = coalesce(p.provider_id, st.provider_message_id),
        finished_at = CASE WHEN p.new_status IN ('sent', 'failed', 'cancelled') THEN v_now END
    FROM plan p
    WHERE st.subtask_id = p.subtask_id AND p.ok
  ),
  events AS (
    INSERT INTO edm.send_events (occurred_at, subtask_id, task_id, user_id, service_id, kind,
                                 attempt, started_at, code, response_ms, dispatcher, detail)
    SELECT v_now, p.subtask_id, p.task_id, p.user_id, p.service_id,
           CASE WHEN NOT p.ok THEN 'late_completion'
                WHEN p.eff = 'sent' THEN 'sent'
                WHEN p.eff = 'service' THEN 'service_failure'
                WHEN p.eff IN ('throttled', 'throttled_service') THEN 'throttled'
                WHEN p.eff = 'released' THEN 'released'
                WHEN p.eff = 'uncertain' THEN 'uncertain'
                WHEN p.eff = 'render_error' THEN 'render_error'
                WHEN p.new_status = 'failed' THEN 'failed'
                WHEN p.new_status = 'cancelled' THEN 'cancelled'
                ELSE 'retry' END,
           p.attempts, p.leased_at, p.code, p.response_ms, p_owner,
           CASE WHEN NOT p.ok THEN p.reject_reason || ' (reported ' || p.outcome || ')'
                WHEN p.rule_id IS NOT NULL
                  THEN left('reply rule ' || p.rule_name || ' (' || p.rule_action || '): '
                            || coalesce(p.detail, ''), 2000)
                ELSE p.detail END
    FROM plan p
    WHERE p.task_id IS NOT NULL
  ),
  actions AS (
    INSERT INTO edm.shaping_actions (at, rule_id, rule_name, service_id, site, subtask_id, action,
                                     until, level, code, reply)
    SELECT v_now, p.rule_id, p.rule_name, p.service_id, p.site, p.subtask_id, p.rule_action,
           CASE p.eff
             WHEN 'throttled' THEN coalesce(np.until, v_now + make_interval(secs => p.duration_s))
             WHEN 'throttled_service' THEN us.backoff_until
             WHEN 'retry' THEN CASE WHEN p.new_status = 'pending'
                                    THEN v_now + make_interval(secs => p.duration_s) END
           END,
           np.level, p.code, p.detail
    FROM plan p
    LEFT JOIN new_pairs np ON np.service_id = p.service_id AND np.site = p.site
                          AND p.eff = 'throttled'
    LEFT JOIN upd_services us ON us.service_id = p.service_id AND p.eff = 'throttled_service'
    WHERE v_rule_ids IS NOT NULL AND p.ok AND p.rule_id IS NOT NULL
  ),
  suppress AS (
    INSERT INTO edm.suppressions (user_id, email, reason, source_subtask_id)
    SELECT DISTINCT ON (p.email) NULL::text, p.email, 'hard_bounce', p.subtask_id
    FROM plan p
    WHERE p.ok AND p.eff = 'permanent' AND edm.smtp_code_suppresses(p.code)
    ORDER BY p.email, p.subtask_id
    ON CONFLICT DO NOTHING
  )
  SELECT p.subtask_id, p.ok, CASE WHEN p.ok THEN p.new_status ELSE p.old_status END,
         CASE WHEN NOT p.ok THEN p.reject_reason
              WHEN p.rule_id IS NOT NULL
                THEN 'reply rule ' || p.rule_name || ': ' || p.rule_action
                     || CASE WHEN p.eff = 'throttled' AND p.site IS NOT NULL THEN ' ' || p.site
                             WHEN p.eff = 'throttled' THEN ' (no site: recipient retried)'
                             ELSE '' END
         END
  FROM plan p;
END;
$function$;
COMMENT ON FUNCTION edm.complete(text,bigint[],text[],integer[],text[],integer[],text[],timestamp with time zone) IS 'Records the outcomes of claimed subtasks in one transaction, fenced by the lease: only p_owner, before the lease expires, may complete. Outcomes: sent; transient (retry with back-off, failed after queue.max_attempts); uncertain (the connection was lost or timed out after the final dot: retried like transient, counted in uncertain_sends and recorded as an uncertain event, so a resend is a counted possible duplicate); permanent (failed; address suppressed for 550/551/553); render_error (the message could not be built: failed, no attempt and no quota unit spent); service (the service backs off, the subtask returns to pending without using an attempt); released (unsent, e.g. its lease would end before its send could start, or shutdown). A transient, permanent or service outcome with a reply (p_codes, p_details) is first matched against edm.reply_rules (edm.match_reply_rule, once per distinct reply): suspend_site suspends the (service, recipient''s site) pair with escalation and returns the subtask to pending spending nothing and counting no failure (no site: retried after the rule''s duration); suspend_service backs the service off for the rule''s duration (subtask as for service); bounce fails it; retry retries it after the rule''s duration. Each application is logged in edm.shaping_actions and named in the result''s reason (''reply rule <name>: <action> [site]''). Task counters, service statistics, send_events and (for subtasks of a cancelled task, which end cancelled) the refund of the owner''s quota change together; rejected completions are returned with a reason and recorded as late_completion.';
REVOKE ALL ON FUNCTION edm.complete(text,bigint[],text[],integer[],text[],integer[],text[],timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.expire_leases(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone, p_limit integer DEFAULT 10000)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_ids bigint[];
  v_max_attempts integer := edm.config_int('queue.max_attempts');
  v_n integer;
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000000 THEN
    RAISE EXCEPTION 'expire_leases: limit must be between 1 and 1000000' USING ERRCODE = 'ED005';
  END IF;
  -- Subtasks first (a completion racing us holds its rows: skip them; it will
  -- be rejected or has just succeeded), then tasks in id order.
  SELECT array_agg(x.subtask_id) INTO v_ids FROM (
    SELECT st.subtask_id FROM edm.subtasks st
    WHERE st.status = 'leased' AND st.lease_expires_at <= v_now
    ORDER BY st.subtask_id
    LIMIT p_limit
    FOR NO KEY UPDATE SKIP LOCKED) x;
  IF v_ids IS NULL THEN
    RETURN 0;
  END IF;
  PERFORM 1 FROM edm.tasks t
  WHERE t.task_id IN (SELECT st.task_id FROM edm.subtasks st WHERE st.subtask_id = ANY (v_ids))
  ORDER BY t.task_id FOR NO KEY UPDATE;
  PERFORM 1 FROM edm.users u
  WHERE u.user_id IN (SELECT t.user_id FROM edm.subtasks st JOIN edm.tasks t ON t.task_id = st.task_id
                      WHERE st.subtask_id = ANY (v_ids) AND t.status = 'cancelled')
  ORDER BY u.user_id FOR NO KEY UPDATE;

  WITH plan AS (
    SELECT st.subtask_id, st.task_id, st.service_id, st.attempts, st.leased_at, st.lease_owner,
           t.user_id,
           edm.subtask_next_status('lease_expired', t.status, st.attempts, v_max_attempts) AS new_status
    FROM edm.subtasks st JOIN edm.tasks t ON t.task_id = st.task_id
    WHERE st.subtask_id = ANY (v_ids)
  ),
  upd_tasks AS (
    UPDATE edm.tasks t
    SET leased_count = t.leased_count - a.n,
        pending_count = t.pending_count + a.n_pending,
        failed_count = t.failed_count + a.n_failed,
        cancelled_count = t.cancelled_count + a.n_cancelled,
        quota_reserved = greatest(t.quota_reserved - a.n_failed - a.n_cancelled, 0)
        -- a task this drains is completed by trigger tasks_when_drained
    FROM (SELECT p.task_id, count(*) AS n,
                 count(*) FILTER (WHERE p.new_status = 'pending') AS n_pending,
                 count(*) FILTER (WHERE p.new_status = 'failed') AS n_failed,
                 count(*) FILTER (WHERE p.new_status = 'cancelled') AS n_cancelled
          FROM plan p GROUP BY p.task_id) a
    WHERE t.task_id = a.task_id
  ),
  upd_subtasks AS (
    UPDATE edm.subtasks st
    SET status = p.new_status, lease_owner = NULL, lease_expires_at = NULL,
        lease_expiries = st.lease_expiries + 1,
        not_before = CASE WHEN p.new_status = 'pending' THEN '-infinity' ELSE st.not_before END,
        outcome_detail = CASE WHEN p.new_status = 'failed'
                              THEN 'lease expired on the last allowed attempt (outcome unknown)'
                              ELSE st.outcome_detail END,
        finished_at = CASE WHEN p.new_status <> 'pending' THEN v_now END
    FROM plan p WHERE st.subtask_id = p.subtask_id
  ),
  -- cancelled, never sent: refund the owner's quota (as in edm.complete)
  refund_users AS (
    UPDATE edm.users u SET quota_used = u.quota_used - a.n
    FROM (SELECT p.user_id, count(*) AS n FROM plan p
          WHERE p.new_status = 'cancelled' GROUP BY p.user_id) a
    WHERE u.user_id = a.user_id
  )
  INSERT INTO edm.send_events (occurred_at, subtask_id, task_id, user_id, service_id, kind,
                               attempt, started_at, dispatcher, detail)
  SELECT v_now, p.subtask_id, p.task_id, p.user_id, p.service_id, 'lease_expired',
         p.attempts, p.leased_at, p.lease_owner,
         'lease expired: the send may or may not have happened; now ' || p.new_status
  FROM plan p;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.expire_leases(timestamp with time zone,integer) IS 'Returns subtasks whose lease expired to pending (or failed after queue.max_attempts, or cancelled when their task was, refunding the owner''s quota), counting lease_expiries and recording a lease_expired event: the uncertain outcomes of I1. Returns how many it handled.';
REVOKE ALL ON FUNCTION edm.expire_leases(timestamp with time zone,integer) FROM PUBLIC;

CREATE FUNCTION edm.renew_leases(p_owner text, p_subtask_ids bigint[], p_lease_seconds integer DEFAULT NULL::integer, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(subtask_id bigint, lease_expires_at timestamp with time zone)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_now   timestamptz := coalesce(p_now, now());
  v_lease interval;
  v_hold  interval := make_interval(secs => edm.config_int('queue.service_hold_seconds'));
BEGIN
  IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'renew_leases: owner must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF p_lease_seconds IS NOT NULL AND p_lease_seconds NOT BETWEEN 1 AND 86400 THEN
    RAISE EXCEPTION 'renew_leases: lease must be between 1 and 86400 seconds, got %', p_lease_seconds
      USING ERRCODE = 'ED005';
  END IF;
  IF cardinality(p_subtask_ids) > 10000 THEN
    RAISE EXCEPTION 'renew_leases: at most 10000 subtasks per call' USING ERRCODE = 'ED005';
  END IF;
  v_lease := make_interval(secs => coalesce(p_lease_seconds,
                                            edm.config_int('queue.service_reservation_timeout')));
  -- Lock order of the header of 0002: subtasks, then services by id.
  PERFORM 1 FROM edm.subtasks st WHERE st.subtask_id = ANY (p_subtask_ids)
  ORDER BY st.subtask_id FOR NO KEY UPDATE;
  PERFORM 1 FROM edm.services s
  WHERE s.held_by = p_owner
    AND s.service_id IN (SELECT st.service_id FROM edm.subtasks st
                         WHERE st.subtask_id = ANY (p_subtask_ids))
  ORDER BY s.service_id FOR NO KEY UPDATE;
  UPDATE edm.services s SET held_until = greatest(s.held_until, v_now + v_hold)
  WHERE s.held_by = p_owner
    AND s.service_id IN (SELECT st.service_id FROM edm.subtasks st
                         WHERE st.subtask_id = ANY (p_subtask_ids) AND st.status = 'leased'
                           AND st.lease_owner = p_owner AND st.lease_expires_at > v_now);
  -- Fenced like a completion: only the holder's live leases are extended;
  -- one that already ran out stays expired (the sweep records it).
  RETURN QUERY
  UPDATE edm.subtasks st SET lease_expires_at = greatest(st.lease_expires_at, v_now + v_lease)
  WHERE st.subtask_id = ANY (p_subtask_ids) AND st.status = 'leased'
    AND st.lease_owner = p_owner AND st.lease_expires_at > v_now
  RETURNING st.subtask_id, st.lease_expires_at;
END;
$function$;
COMMENT ON FUNCTION edm.renew_leases(text,bigint[],integer,timestamp with time zone) IS 'Keeps leases alive while their sends wait on a slow provider: extends each of p_owner''s live leases among p_subtask_ids to now + p_lease_seconds (default queue.service_reservation_timeout), and p_owner''s holds of their services to now + queue.service_hold_seconds. Returns the leases still held with their new expiry; a lease that already expired is not revived (nothing may be sent on it).';
REVOKE ALL ON FUNCTION edm.renew_leases(text,bigint[],integer,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.release_holds(p_owner text, p_service_ids bigint[] DEFAULT NULL::bigint[])
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  UPDATE edm.services s SET held_by = NULL, held_until = NULL
  WHERE s.service_id IN (SELECT x.service_id FROM edm.services x WHERE x.held_by = p_owner
                           AND (p_service_ids IS NULL OR x.service_id = ANY (p_service_ids))
                         ORDER BY x.service_id FOR NO KEY UPDATE);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.release_holds(text,bigint[]) IS 'Ends the holds of dispatcher p_owner on services p_service_ids (default: all of them, at shutdown), so others may claim them at once: a dispatcher releases the services whose lanes ran empty while it has no room to claim. Returns how many were released.';
REVOKE ALL ON FUNCTION edm.release_holds(text,bigint[]) FROM PUBLIC;

CREATE FUNCTION edm.report_pace(p_owner text, p_service_ids bigint[], p_next_starts timestamp with time zone[])
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  IF cardinality(p_service_ids) IS DISTINCT FROM cardinality(p_next_starts)
     OR cardinality(p_service_ids) > 10000 THEN
    RAISE EXCEPTION 'report_pace: service ids and next starts must pair up (at most 10000)'
      USING ERRCODE = 'ED005';
  END IF;
  -- Only services p_owner holds, and only later: the next slot can move back
  -- never, so no limit can be broken by a report.
  WITH moved AS (
    UPDATE edm.services s
    SET last_sent_at = greatest(s.last_sent_at, x.next_start - s.interval_ms * interval '1 millisecond')
    FROM (SELECT y.service_id, y.next_start FROM unnest(p_service_ids, p_next_starts)
            AS y(service_id, next_start)
          ORDER BY y.service_id) x
    WHERE s.service_id = x.service_id AND s.held_by = p_owner
      AND s.service_id IN (SELECT z.service_id FROM edm.services z
                           WHERE z.service_id = ANY (p_service_ids) AND z.held_by = p_owner
                           ORDER BY z.service_id FOR NO KEY UPDATE SKIP LOCKED)
    RETURNING s.service_id, x.next_start
  ),
  -- each rate limit admits its next send at tat - (burst - 1) * T (GCRA): no
  -- earlier than the reported start
  rates AS (
    UPDATE edm.service_limits l
    SET tat = greatest(l.tat, m.next_start
                              + ((l.burst - 1) * l.window_ms::double precision / l.max_count)
                                * interval '1 millisecond')
    FROM moved m
    WHERE l.service_id = m.service_id AND l.kind = 'rate' AND l.max_count > 0
    RETURNING l.service_id
  )
  SELECT count(*) INTO v_n FROM moved;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.report_pace(text,bigint[],timestamp with time zone[]) IS 'A dispatcher whose lane of a held service runs late (its sends start after their slots: a stalled event loop, a slow server, a start the provider saw late) tells when the service''s next send can really start; the service''s next slot moves there (never earlier): its interval counts from there and each of its rate limits admits no send before it. Slots claimed afterwards follow the wire instead of piling up lateness. Services not held by p_owner, or locked by a claim, are left alone. Returns how many moved.';
REVOKE ALL ON FUNCTION edm.report_pace(text,bigint[],timestamp with time zone[]) FROM PUBLIC;

CREATE FUNCTION edm.live_dispatcher_count(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE sql
 STABLE
RETURN (SELECT count(*) AS count FROM edm.dispatchers d WHERE ((d.stopped_at IS NULL) AND (d.heartbeat_at > (COALESCE(live_dispatcher_count.p_now, now()) - '00:00:30'::interval))));
COMMENT ON FUNCTION edm.live_dispatcher_count(timestamp with time zone) IS 'Dispatchers not stopped whose heartbeat (every 10 s) is less than 30 s old at p_now (default now()): the same rule as edm.system_health.dispatchers_alive. 0 means nothing is sending.';
REVOKE ALL ON FUNCTION edm.live_dispatcher_count(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.next_wakeup(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_at timestamptz;
BEGIN
  v_at := least(
    -- Walk services_ready_idx in time order and stop at the first service
    -- some user with work may use. The probe is a scalar subquery, not
    -- EXISTS: PostgreSQL flattens EXISTS into a semi-join (dropping its
    -- LIMIT) and hashes every user with work on each call.
    (SELECT s.next_available_at FROM edm.services s
     WHERE s.enabled AND s.daily_quota > 0
       AND (SELECT true FROM edm.grants g JOIN edm.users u ON u.user_id = g.user_id
            WHERE g.service_id = s.service_id AND u.claimable_tasks > 0 LIMIT 1)
     ORDER BY s.next_available_at LIMIT 1),
    (SELECT min(t.scheduled_at) FROM edm.tasks t WHERE t.status = 'scheduled'),
    (SELECT min(st.lease_expires_at) FROM edm.subtasks st WHERE st.status = 'leased'));
  IF v_at IS NULL THEN
    RETURN NULL;  -- nothing is waiting
  END IF;
  -- A time already past (including -infinity: a service never used) is "now".
  RETURN greatest(v_at, coalesce(p_now, now()));
END;
$function$;
COMMENT ON FUNCTION edm.next_wakeup(timestamp with time zone) IS 'The earliest time a claim or a lease expiry could next have work: a service with work becoming ready, a scheduled task starting, or a lease expiring. NULL when nothing is waiting. Dispatchers sleep until then (or a NOTIFY).';
REVOKE ALL ON FUNCTION edm.next_wakeup(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.next_wakeup_v2(p_owner text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone, p_lookahead_ms integer DEFAULT NULL::integer)
 RETURNS timestamp with time zone
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now  timestamptz := coalesce(p_now, now());
  v_look interval := coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms'))
                     * interval '1 millisecond';
  v_at   timestamptz;
BEGIN
  v_at := least(
    -- Walk services_ready_idx in time order and stop at the first service
    -- this dispatcher may claim (not held by another) that some user with
    -- work may use; it becomes claimable a lookahead before its slot.
    (SELECT s.next_available_at - v_look FROM edm.services s
     WHERE s.enabled AND s.daily_quota > 0
       AND (s.held_until IS NULL OR s.held_until <= v_now OR s.held_by = p_owner)
       AND (SELECT true FROM edm.grants g JOIN edm.users u ON u.user_id = g.user_id
            WHERE g.service_id = s.service_id AND u.claimable_tasks > 0 LIMIT 1)
     ORDER BY s.next_available_at LIMIT 1),
    -- Services held by others: claimable by us when the hold ends.
    (SELECT min(s.held_until) FROM edm.services s
     WHERE s.enabled AND s.held_until > v_now AND s.held_by <> p_owner
       AND (SELECT true FROM edm.grants g JOIN edm.users u ON u.user_id = g.user_id
            WHERE g.service_id = s.service_id AND u.claimable_tasks > 0 LIMIT 1)),
    (SELECT min(t.scheduled_at) FROM edm.tasks t WHERE t.status = 'scheduled'),
    (SELECT min(st.lease_expires_at) FROM edm.subtasks st WHERE st.status = 'leased'));
  IF v_at IS NULL THEN
    RETURN NULL;  -- nothing is waiting
  END IF;
  RETURN greatest(v_at, v_now);
END;
$function$;
COMMENT ON FUNCTION edm.next_wakeup_v2(text,timestamp with time zone,integer) IS 'For dispatcher p_owner: the earliest time a claim_v2 or a lease expiry could next have work (a service with work coming within the slot lookahead, a hold of another dispatcher ending, a scheduled task starting, a lease expiring). NULL when nothing is waiting.';
REVOKE ALL ON FUNCTION edm.next_wakeup_v2(text,timestamp with time zone,integer) FROM PUBLIC;

-- ==========================================================================
-- Sweeps, alerts and metrics
-- Periodic maintenance run by the elected dispatcher.
-- ==========================================================================

CREATE TABLE edm.sweep_state (
  name text NOT NULL,
  watermark timestamp with time zone NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT sweep_state_pkey PRIMARY KEY (name)
);
COMMENT ON TABLE edm.sweep_state IS 'Progress markers of incremental sweeps (e.g. how far send_events were rolled up).';
COMMENT ON COLUMN edm.sweep_state.name IS 'Sweep name.';
COMMENT ON COLUMN edm.sweep_state.watermark IS 'Everything before this time has been processed.';
COMMENT ON COLUMN edm.sweep_state.updated_at IS 'Last run.';

CREATE TABLE edm.alerts (
  alert_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  raised_at timestamp with time zone DEFAULT now() NOT NULL,
  kind text NOT NULL,
  severity text NOT NULL,
  task_id bigint,
  service_id bigint,
  user_id text,
  message text NOT NULL,
  notified_at timestamp with time zone,
  resolved_at timestamp with time zone,
  CONSTRAINT alerts_pkey PRIMARY KEY (alert_id),
  CONSTRAINT alerts_kind_check CHECK ((kind = ANY ('{quota,reputation,service,stuck,wait}'::text[]))),
  CONSTRAINT alerts_severity_check CHECK ((severity = ANY (ARRAY['info'::text, 'warning'::text, 'critical'::text, 'emergency'::text])))
);
COMMENT ON TABLE edm.alerts IS 'Alerts raised by the sweeps (waits, quotas, stuck tasks), handed to the host callback once (notified_at).';
COMMENT ON COLUMN edm.alerts.alert_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.alerts.raised_at IS 'When the alert was raised.';
COMMENT ON COLUMN edm.alerts.kind IS 'wait, quota, stuck, service or reputation (a bounce or complaint rate over a threshold).';
COMMENT ON COLUMN edm.alerts.severity IS 'info, warning, critical or emergency.';
COMMENT ON COLUMN edm.alerts.task_id IS 'Task concerned, if any.';
COMMENT ON COLUMN edm.alerts.service_id IS 'Service concerned, if any.';
COMMENT ON COLUMN edm.alerts.user_id IS 'User concerned, if any.';
COMMENT ON COLUMN edm.alerts.message IS 'Human-readable description.';
COMMENT ON COLUMN edm.alerts.notified_at IS 'When the host callback received the alert.';
COMMENT ON COLUMN edm.alerts.resolved_at IS 'When the condition cleared.';
CREATE UNIQUE INDEX alerts_open_idx ON edm.alerts USING btree (kind, severity, COALESCE(task_id, (0)::bigint), COALESCE(service_id, (0)::bigint), COALESCE(user_id, ''::text)) WHERE (resolved_at IS NULL);
COMMENT ON INDEX edm.alerts_open_idx IS 'At most one open alert per kind, severity and subject (task, service, user).';

CREATE TABLE edm.metrics_hourly (
  hour timestamp with time zone NOT NULL,
  service_id bigint NOT NULL,
  user_id text NOT NULL,
  sent bigint DEFAULT 0 NOT NULL,
  failed bigint DEFAULT 0 NOT NULL,
  retried bigint DEFAULT 0 NOT NULL,
  service_failures bigint DEFAULT 0 NOT NULL,
  lease_expired bigint DEFAULT 0 NOT NULL,
  response_ms_sum bigint DEFAULT 0 NOT NULL,
  response_count bigint DEFAULT 0 NOT NULL,
  CONSTRAINT metrics_hourly_pkey PRIMARY KEY (hour, service_id, user_id)
);
COMMENT ON TABLE edm.metrics_hourly IS 'Hourly roll-up of send_events per service and user, kept for monitoring.metrics_retention_days.';
COMMENT ON COLUMN edm.metrics_hourly.hour IS 'Start of the hour (UTC).';
COMMENT ON COLUMN edm.metrics_hourly.service_id IS 'Service.';
COMMENT ON COLUMN edm.metrics_hourly.user_id IS 'User.';
COMMENT ON COLUMN edm.metrics_hourly.sent IS 'Messages accepted by the provider.';
COMMENT ON COLUMN edm.metrics_hourly.failed IS 'Permanent failures.';
COMMENT ON COLUMN edm.metrics_hourly.retried IS 'Transient failures scheduled for retry.';
COMMENT ON COLUMN edm.metrics_hourly.service_failures IS 'Service-level failures.';
COMMENT ON COLUMN edm.metrics_hourly.lease_expired IS 'Expired leases (uncertain outcomes).';
COMMENT ON COLUMN edm.metrics_hourly.response_ms_sum IS 'Sum of provider response times (ms), for averages.';
COMMENT ON COLUMN edm.metrics_hourly.response_count IS 'Number of response times summed.';

CREATE FUNCTION edm.run_sweeps(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_report jsonb;
  v_step text;
  v_value bigint;
BEGIN
  -- Recovery first, and outside the guarded steps below: nothing that goes
  -- wrong in maintenance may keep expired leases from coming back (I7).
  v_report := jsonb_build_object('leases_expired', edm.expire_leases(p_now));
  -- Each maintenance step runs in its own subtransaction: a failing step is
  -- reported (and logged by the dispatcher) without undoing the others.
  FOREACH v_step IN ARRAY ARRAY['quota_days_rolled', 'warmups_applied', 'tasks_started', 'tasks_completed',
                                'alerts_raised', 'metrics_rows', 'partitions_created',
                                'retention_removed', 'shaping_actions_trimmed'] LOOP
    BEGIN
      v_value := CASE v_step
        WHEN 'quota_days_rolled' THEN edm.roll_quota_days(p_now)
        WHEN 'warmups_applied' THEN edm.apply_warmups(p_now)
        WHEN 'tasks_started' THEN edm.start_due_tasks(p_now)
        WHEN 'tasks_completed' THEN edm.finish_tasks(p_now)
        WHEN 'alerts_raised' THEN edm.sweep_alerts(p_now)
        WHEN 'metrics_rows' THEN edm.roll_up_metrics(p_now)
        WHEN 'partitions_created' THEN edm.ensure_partitions(p_now)
        WHEN 'retention_removed' THEN edm.apply_retention(p_now)
        WHEN 'shaping_actions_trimmed' THEN edm.trim_shaping_actions(p_now)
      END;
      v_report := v_report || jsonb_build_object(v_step, v_value);
    EXCEPTION WHEN OTHERS THEN
      v_report := v_report || jsonb_build_object(v_step, NULL)
                  || jsonb_build_object('errors', coalesce(v_report -> 'errors', '[]'::jsonb)
                                                  || to_jsonb(v_step || ': ' || SQLERRM));
    END;
  END LOOP;
  RETURN v_report;
END;
$function$;
COMMENT ON FUNCTION edm.run_sweeps(timestamp with time zone) IS 'One round of every sweep: expired leases first, then quota-day rollover, due tasks, task completion, alerts (waits, stuck tasks, quotas), metric roll-ups, partitions and retention, each in its own subtransaction so that a failing step is reported under "errors" without undoing the others. Run by the elected dispatcher every sweep.interval seconds, or by edm-sched sweep. Returns a report. Step warmups_applied moves warm-up ceilings to the day''s (edm.apply_warmups). Step shaping_actions_trimmed deletes ended reply-rule log rows past retention.shaping_action_days (edm.trim_shaping_actions).';
REVOKE ALL ON FUNCTION edm.run_sweeps(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.roll_quota_days(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  -- Claims roll a service's quota day lazily; this makes views and alerts
  -- right for idle services too. SKIP LOCKED: never wait on a claim.
  UPDATE edm.services s
  SET sent_today = 0, quota_day = (coalesce(p_now, now()) AT TIME ZONE s.quota_tz)::date,
      quota_exhausted_until = NULL
  WHERE s.service_id IN (
    SELECT x.service_id FROM edm.services x
    WHERE x.quota_day < (coalesce(p_now, now()) AT TIME ZONE x.quota_tz)::date
    FOR NO KEY UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.roll_quota_days(timestamp with time zone) IS 'Starts a new quota day for every service whose local midnight (in its quota_tz) has passed: sent_today back to 0. Returns how many services rolled over.';
REVOKE ALL ON FUNCTION edm.roll_quota_days(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.finish_tasks(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  UPDATE edm.tasks t SET finished_at = coalesce(p_now, now())
  WHERE t.task_id IN (
    SELECT x.task_id FROM edm.tasks x
    WHERE edm.task_drained(x.status, x.pending_count, x.leased_count)
    FOR NO KEY UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.finish_tasks(timestamp with time zone) IS 'Safety net: touches drained tasks left sending (e.g. by a database upgraded from before 0019) so that trigger tasks_when_drained completes them, finished at p_now. Every other path completes a task in the statement that drains it.';
REVOKE ALL ON FUNCTION edm.finish_tasks(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.raise_alert(p_kind text, p_severity text, p_message text, p_task_id bigint DEFAULT NULL::bigint, p_service_id bigint DEFAULT NULL::bigint, p_user_id text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS boolean
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
BEGIN ATOMIC
 WITH ins AS (
          INSERT INTO edm.alerts (raised_at, kind, severity, task_id, service_id, user_id, message)
           VALUES (COALESCE(raise_alert.p_now, now()), raise_alert.p_kind, raise_alert.p_severity, raise_alert.p_task_id, raise_alert.p_service_id, raise_alert.p_user_id, raise_alert.p_message) ON CONFLICT(kind, severity, (COALESCE(task_id, (0)::bigint)), (COALESCE(service_id, (0)::bigint)), (COALESCE(user_id, ''::text)))
           WHERE (resolved_at IS NULL) DO NOTHING
           RETURNING 1 AS "?column?"
         )
  SELECT (EXISTS ( SELECT 1
            FROM ins)) AS "exists";
END;
COMMENT ON FUNCTION edm.raise_alert(text,text,text,bigint,bigint,text,timestamp with time zone) IS 'Records an alert unless the same one (kind, severity, subject: task, service, user) is already open; true when recorded.';
REVOKE ALL ON FUNCTION edm.raise_alert(text,text,text,bigint,bigint,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.sweep_alerts(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_warn integer := edm.config_int('monitoring.wait_warning');
  v_crit integer := edm.config_int('monitoring.wait_critical');
  v_emer integer := edm.config_int('monitoring.wait_emergency');
  v_quota integer := edm.config_int('monitoring.quota_alert_percent');
  v_stuck integer := edm.config_int('monitoring.stuck_task_threshold');
  v_n integer := 0;
  r record;
BEGIN
  -- First-send waits: tasks due, with work, and nothing claimed yet.
  FOR r IN
    SELECT t.task_id, t.user_id, t.name, extract(epoch FROM v_now - t.scheduled_at) AS wait
    FROM edm.tasks t
    WHERE t.status IN ('scheduled', 'sending') AND t.first_claimed_at IS NULL
      AND t.pending_count > 0 AND t.scheduled_at <= v_now - make_interval(secs => v_warn)
  LOOP
    IF edm.raise_alert('wait',
         CASE WHEN r.wait >= v_emer THEN 'emergency' WHEN r.wait >= v_crit THEN 'critical'
              ELSE 'warning' END,
         format('task %s (%s) of user %s has waited %s s for its first send',
                r.task_id, r.name, r.user_id, round(r.wait)),
         r.task_id, NULL, r.user_id, v_now) THEN
      v_n := v_n + 1;
    END IF;
  END LOOP;
  UPDATE edm.alerts a SET resolved_at = v_now
  FROM edm.tasks t
  WHERE a.kind = 'wait' AND a.resolved_at IS NULL AND t.task_id = a.task_id
    AND (t.first_claimed_at IS NOT NULL OR t.status NOT IN ('scheduled', 'sending'));

  -- Stuck tasks: sending, with work left, no claim or completion for too long.
  FOR r IN
    UPDATE edm.tasks t SET stuck_since = v_now
    WHERE t.status = 'sending' AND t.stuck_since IS NULL
      AND t.pending_count + t.leased_count > 0
      AND coalesce(t.last_activity_at, t.started_at, t.scheduled_at)
          <= v_now - make_interval(secs => v_stuck)
    RETURNING t.task_id, t.user_id, t.name
  LOOP
    IF edm.raise_alert('stuck', 'critical',
         format('task %s (%s) of user %s made no progress for %s s; see edm.task_wait_reasons',
                r.task_id, r.name, r.user_id, v_stuck),
         r.task_id, NULL, r.user_id, v_now) THEN
      v_n := v_n + 1;
    END IF;
  END LOOP;
  UPDATE edm.alerts a SET resolved_at = v_now
  FROM edm.tasks t
  WHERE a.kind = 'stuck' AND a.resolved_at IS NULL AND t.task_id = a.task_id
    AND t.stuck_since IS NULL;

  -- Services past the quota alert share of today's quota.
  FOR r IN
    SELECT s.service_id, s.name, edm.service_sent_today(s, v_now) AS used, s.daily_quota
    FROM edm.services s
    WHERE s.enabled AND s.daily_quota > 0
      AND edm.service_sent_today(s, v_now)::bigint * 100 >= v_quota::bigint * s.daily_quota
  LOOP
    IF edm.raise_alert('quota', 'warning',
         format('service %s (%s) used %s of its daily quota of %s', r.service_id, r.name,
                r.used, r.daily_quota),
         NULL, r.service_id, NULL, v_now) THEN
      v_n := v_n + 1;
    END IF;
  END LOOP;
  UPDATE edm.alerts a SET resolved_at = v_now
  FROM edm.services s
  WHERE a.kind = 'quota' AND a.resolved_at IS NULL AND s.service_id = a.service_id
    AND edm.service_sent_today(s, v_now)::bigint * 100 < v_quota::bigint * s.daily_quota;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.sweep_alerts(timestamp with time zone) IS 'Raises (and resolves) alerts: first-send waits past monitoring.wait_warning / _critical / _emergency, tasks without progress past monitoring.stuck_task_threshold (flagged in tasks.stuck_since), services past monitoring.quota_alert_percent of their daily quota. Returns how many alerts were raised.';
REVOKE ALL ON FUNCTION edm.sweep_alerts(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.take_alerts(p_limit integer DEFAULT 100)
 RETURNS TABLE(alert_id bigint, raised_at timestamp with time zone, kind text, severity text, task_id bigint, service_id bigint, user_id text, message text)
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
BEGIN ATOMIC
 UPDATE edm.alerts a SET notified_at = now()
   WHERE (a.alert_id IN ( SELECT x.alert_id
            FROM edm.alerts x
           WHERE (x.notified_at IS NULL)
           ORDER BY x.alert_id
          LIMIT take_alerts.p_limit
          FOR UPDATE OF x SKIP LOCKED))
   RETURNING a.alert_id,
     a.raised_at,
     a.kind,
     a.severity,
     a.task_id,
     a.service_id,
     a.user_id,
     a.message;
END;
COMMENT ON FUNCTION edm.take_alerts(integer) IS 'Marks up to p_limit not-yet-notified alerts as notified and returns them, for the host''s alert callback (each alert is handed over once).';
REVOKE ALL ON FUNCTION edm.take_alerts(integer) FROM PUBLIC;

CREATE FUNCTION edm.trg_quota_day_alerts()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  UPDATE edm.alerts a
  SET resolved_at = edm.service_next_quota_day(NEW.quota_tz, a.raised_at)
  WHERE a.kind = 'quota' AND a.resolved_at IS NULL AND a.service_id = NEW.service_id
    AND (a.raised_at AT TIME ZONE NEW.quota_tz)::date < NEW.quota_day;
  RETURN NULL;
END;
$function$;
COMMENT ON FUNCTION edm.trg_quota_day_alerts() IS 'Trigger: when a service starts a new quota day (quota_day moves forward, by a claim or edm.roll_quota_days), its open quota alerts of earlier days are resolved at the local midnight that ended them.';
REVOKE ALL ON FUNCTION edm.trg_quota_day_alerts() FROM PUBLIC;

CREATE FUNCTION edm.resolve_stale_quota_alerts(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_n integer;
BEGIN
  -- An alert raised in an earlier quota day (in the service's quota_tz) than
  -- the one at p_now is over: it ended at that day's local midnight.
  UPDATE edm.alerts a
  SET resolved_at = edm.service_next_quota_day(s.quota_tz, a.raised_at)
  FROM edm.services s
  WHERE a.kind = 'quota' AND a.resolved_at IS NULL AND s.service_id = a.service_id
    AND (a.raised_at AT TIME ZONE s.quota_tz)::date
        < (coalesce(p_now, now()) AT TIME ZONE s.quota_tz)::date;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.resolve_stale_quota_alerts(timestamp with time zone) IS 'Resolves open quota alerts raised in an earlier quota day (in the service''s quota_tz) than the one at p_now (default now()), dated at the local midnight that ended that day. Returns how many. The trigger services_quota_day_alerts does the same as each service starts a new quota day.';
REVOKE ALL ON FUNCTION edm.resolve_stale_quota_alerts(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.roll_up_metrics(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_from timestamptz;
  v_to timestamptz := coalesce(p_now, now()) - interval '5 seconds';
  v_n integer;
BEGIN
  SELECT s.watermark INTO v_from FROM edm.sweep_state s WHERE s.name = 'metrics_hourly' FOR UPDATE;
  IF NOT FOUND THEN
    v_from := '-infinity';
    INSERT INTO edm.sweep_state (name, watermark) VALUES ('metrics_hourly', v_to);
  END IF;
  IF v_from >= v_to THEN
    RETURN 0;
  END IF;
  INSERT INTO edm.metrics_hourly AS m (hour, service_id, user_id, sent, failed, retried,
                                       service_failures, lease_expired, response_ms_sum,
                                       response_count)
  SELECT date_trunc('hour', e.occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
         coalesce(e.service_id, 0), e.user_id,
         count(*) FILTER (WHERE e.kind = 'sent'),
         count(*) FILTER (WHERE e.kind = 'failed'),
         count(*) FILTER (WHERE e.kind = 'retry'),
         count(*) FILTER (WHERE e.kind = 'service_failure'),
         count(*) FILTER (WHERE e.kind = 'lease_expired'),
         coalesce(sum(e.response_ms) FILTER (WHERE e.kind = 'sent'), 0),
         count(e.response_ms) FILTER (WHERE e.kind = 'sent')
  FROM edm.send_events e
  WHERE e.occurred_at >= v_from AND e.occurred_at < v_to
  GROUP BY 1, 2, 3
  ON CONFLICT (hour, service_id, user_id) DO UPDATE SET
    sent = m.sent + EXCLUDED.sent, failed = m.failed + EXCLUDED.failed,
    retried = m.retried + EXCLUDED.retried,
    service_failures = m.service_failures + EXCLUDED.service_failures,
    lease_expired = m.lease_expired + EXCLUDED.lease_expired,
    response_ms_sum = m.response_ms_sum + EXCLUDED.response_ms_sum,
    response_count = m.response_count + EXCLUDED.response_count;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  UPDATE edm.sweep_state SET watermark = v_to, updated_at = now() WHERE name = 'metrics_hourly';
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.roll_up_metrics(timestamp with time zone) IS 'Adds send_events recorded since the last roll-up (up to 5 s ago: completions commit late) into edm.metrics_hourly. Incremental; returns the number of hourly rows touched.';
REVOKE ALL ON FUNCTION edm.roll_up_metrics(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.ensure_partitions(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone, p_days_ahead integer DEFAULT 3)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_day date;
  v_name text;
  v_n integer := 0;
BEGIN
  -- Partitions are made for days that have not started yet, so the default
  -- partition never holds rows of a day that later gets its own partition.
  FOR v_day IN
    SELECT d::date FROM generate_series((coalesce(p_now, now()) AT TIME ZONE 'UTC')::date + 1,
                                        (coalesce(p_now, now()) AT TIME ZONE 'UTC')::date + p_days_ahead,
                                        interval '1 day') d
  LOOP
    v_name := 'send_events_' || to_char(v_day, 'YYYYMMDD');
    CONTINUE WHEN to_regclass('edm.' || v_name) IS NOT NULL;
    BEGIN
      EXECUTE format('CREATE TABLE edm.%I PARTITION OF edm.send_events FOR VALUES FROM (%L) TO (%L)',
                     v_name, (v_day::timestamp AT TIME ZONE 'UTC'),
                     ((v_day + 1)::timestamp AT TIME ZONE 'UTC'));
      EXECUTE format('COMMENT ON TABLE edm.%I IS %L', v_name,
                     'send_events of ' || v_day || ' (UTC); dropped after monitoring.metrics_retention_days');
      v_n := v_n + 1;
    EXCEPTION WHEN check_violation THEN
      -- rows of that day already sit in the default partition (clock skew): keep them there
      NULL;
    END;
  END LOOP;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.ensure_partitions(timestamp with time zone,integer) IS 'Creates the daily partitions of edm.send_events for the next p_days_ahead days (UTC), each with a comment. Returns how many were created.';
REVOKE ALL ON FUNCTION edm.ensure_partitions(timestamp with time zone,integer) FROM PUBLIC;

CREATE FUNCTION edm.apply_retention(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_days integer := edm.config_int('monitoring.metrics_retention_days');
  v_cut timestamptz := coalesce(p_now, now()) - make_interval(days => v_days);
  v_part record;
  v_n bigint := 0;
  v_m bigint;
BEGIN
  -- Whole daily partitions older than the cut are dropped (no dead tuples).
  FOR v_part IN
    SELECT c.relname FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE i.inhparent = 'edm.send_events'::regclass AND n.nspname = 'edm'
      AND c.relname ~ '^send_events_[0-9]{8}$'
      AND to_date(substr(c.relname, 13), 'YYYYMMDD') + 1 <= (v_cut AT TIME ZONE 'UTC')::date
  LOOP
    EXECUTE format('DROP TABLE edm.%I', v_part.relname);
    v_n := v_n + 1;
  END LOOP;
  DELETE FROM edm.send_events_default e WHERE e.occurred_at < v_cut;
  GET DIAGNOSTICS v_m = ROW_COUNT;
  v_n := v_n + v_m;
  DELETE FROM edm.metrics_hourly m WHERE m.hour < v_cut;
  DELETE FROM edm.alerts a WHERE a.resolved_at < v_cut;
  -- Finished tasks leave the hot tables (subtasks and templates cascade),
  -- a few per sweep so that one sweep stays short.
  DELETE FROM edm.tasks t
  WHERE t.task_id IN (
    SELECT x.task_id FROM edm.tasks x
    WHERE x.status IN ('completed', 'cancelled', 'failed')
      AND x.finished_at < coalesce(p_now, now())
                          - make_interval(days => edm.config_int('retention.finished_task_days'))
    ORDER BY x.finished_at
    LIMIT edm.config_int('retention.finished_tasks_per_sweep')
    FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_m = ROW_COUNT;
  v_n := v_n + v_m;
  DELETE FROM edm.dispatchers d WHERE d.heartbeat_at < coalesce(p_now, now()) - interval '1 day';
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.apply_retention(timestamp with time zone) IS 'Drops send_events partitions and deletes events, roll-ups and resolved alerts older than monitoring.metrics_retention_days; deletes up to retention.finished_tasks_per_sweep tasks finished more than retention.finished_task_days ago (their subtasks cascade) and dispatcher rows silent for a day. Returns partitions dropped plus rows deleted (events of the default partition, tasks).';
REVOKE ALL ON FUNCTION edm.apply_retention(timestamp with time zone) FROM PUBLIC;

CREATE TRIGGER services_quota_day_alerts AFTER UPDATE OF quota_day ON edm.services FOR EACH ROW WHEN ((new.quota_day IS DISTINCT FROM old.quota_day)) EXECUTE FUNCTION edm.trg_quota_day_alerts();
COMMENT ON TRIGGER services_quota_day_alerts ON edm.services IS 'Resolves the quota alerts of a service''s past quota days as it starts a new one (edm.trg_quota_day_alerts).';

-- ==========================================================================
-- Deliverability: feedback and reputation
-- What is learned after sending (bounces, complaints, unsubscribes) and the reputation breaker that pauses a user or service above the thresholds.
-- ==========================================================================

CREATE TABLE edm.feedback_events (
  event_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  received_at timestamp with time zone DEFAULT now() NOT NULL,
  occurred_at timestamp with time zone,
  kind text NOT NULL,
  source text NOT NULL,
  message_id text,
  recipient text,
  subtask_id bigint,
  task_id bigint,
  user_id text,
  service_id bigint,
  event_key text,
  detail text,
  suppressed boolean DEFAULT false NOT NULL,
  raw text NOT NULL,
  CONSTRAINT feedback_events_pkey PRIMARY KEY (event_id),
  CONSTRAINT feedback_events_detail_check CHECK ((length(detail) <= 10000)),
  CONSTRAINT feedback_events_event_key_check CHECK ((length(event_key) <= 500)),
  CONSTRAINT feedback_events_kind_check CHECK ((kind = ANY (ARRAY['hard_bounce'::text, 'soft_bounce'::text, 'complaint'::text, 'unsubscribe'::text, 'delivered'::text]))),
  CONSTRAINT feedback_events_message_id_check CHECK ((length(message_id) <= 998)),
  CONSTRAINT feedback_events_raw_check CHECK ((length(raw) <= 1000000)),
  CONSTRAINT feedback_events_recipient_check CHECK ((length(recipient) <= 320)),
  CONSTRAINT feedback_events_source_check CHECK ((source ~ '^[a-z][a-z0-9_]{0,31}$'::text))
);
COMMENT ON TABLE edm.feedback_events IS 'What was learned after sending, one row per recipient and event: hard and soft bounces, complaints, unsubscribes, deliveries, from DSNs, ARF reports, ESP webhooks or the host. Found by Message-ID; keeps the raw source. Recorded by edm.record_feedback.';
COMMENT ON COLUMN edm.feedback_events.event_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.feedback_events.received_at IS 'When edm-sched recorded the event; the reputation breaker''s windows count from here.';
COMMENT ON COLUMN edm.feedback_events.occurred_at IS 'When the provider says it happened, if it says.';
COMMENT ON COLUMN edm.feedback_events.kind IS 'hard_bounce, soft_bounce, complaint, unsubscribe or delivered.';
COMMENT ON COLUMN edm.feedback_events.source IS 'Where it came from: dsn, arf, ses, sendgrid, mailgun, postmark, api...';
COMMENT ON COLUMN edm.feedback_events.message_id IS 'Message-ID the event names, as given (edm-sched''s are <edm.TASK.SUBTASK@domain>).';
COMMENT ON COLUMN edm.feedback_events.recipient IS 'Normalised recipient address: the subtask''s when found, else as given.';
COMMENT ON COLUMN edm.feedback_events.subtask_id IS 'Subtask the Message-ID names, NULL when unknown (another sender''s message, or a task already deleted by retention). No foreign key: subtasks are deleted by retention.';
COMMENT ON COLUMN edm.feedback_events.task_id IS 'Task of the subtask.';
COMMENT ON COLUMN edm.feedback_events.user_id IS 'Owner of the task.';
COMMENT ON COLUMN edm.feedback_events.service_id IS 'Service that sent the subtask (its latest attempt).';
COMMENT ON COLUMN edm.feedback_events.event_key IS 'The provider''s id of the event (with the recipient); a repeated delivery of the same webhook is recorded once.';
COMMENT ON COLUMN edm.feedback_events.detail IS 'Status and diagnostic text (e.g. 5.1.1 user unknown, a complaint''s feedback type).';
COMMENT ON COLUMN edm.feedback_events.suppressed IS 'True when this event suppressed the address (hard bounce: for everyone; complaint, unsubscribe: for the user).';
COMMENT ON COLUMN edm.feedback_events.raw IS 'The raw source: the DSN or ARF message, or the webhook''s JSON (at most 1,000,000 characters).';
CREATE UNIQUE INDEX feedback_events_key_idx ON edm.feedback_events USING btree (source, event_key) WHERE (event_key IS NOT NULL);
COMMENT ON INDEX edm.feedback_events_key_idx IS 'A provider event is recorded once however often its webhook is delivered.';
CREATE INDEX feedback_events_service_idx ON edm.feedback_events USING btree (service_id, received_at) WHERE (kind = ANY (ARRAY['hard_bounce'::text, 'complaint'::text]));
COMMENT ON INDEX edm.feedback_events_service_idx IS 'Reputation breaker: a service''s bounces and complaints in a window.';
CREATE INDEX feedback_events_subtask_idx ON edm.feedback_events USING btree (subtask_id);
COMMENT ON INDEX edm.feedback_events_subtask_idx IS 'The feedback of one subtask.';
CREATE INDEX feedback_events_user_idx ON edm.feedback_events USING btree (user_id, received_at) WHERE (kind = ANY (ARRAY['hard_bounce'::text, 'complaint'::text]));
COMMENT ON INDEX edm.feedback_events_user_idx IS 'Reputation breaker: a user''s bounces and complaints in a window.';

CREATE FUNCTION edm.parse_message_id(p_message_id text)
 RETURNS TABLE(task_id bigint, subtask_id bigint)
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
 SELECT (m.m[1])::bigint AS m,
     (m.m[2])::bigint AS m
    FROM regexp_match(parse_message_id.p_message_id, '^\s*<?edm\.([0-9]{1,18})\.([0-9]{1,18})@[^<>@\s]+>?\s*$'::text) m(m);
END;
COMMENT ON FUNCTION edm.parse_message_id(text) IS 'Task and subtask of an edm-sched Message-ID (<edm.TASK.SUBTASK@domain>, angle brackets optional); no row for any other Message-ID.';
REVOKE ALL ON FUNCTION edm.parse_message_id(text) FROM PUBLIC;

CREATE FUNCTION edm.record_feedback(p_kind text, p_message_id text, p_recipient text DEFAULT NULL::text, p_source text DEFAULT 'api'::text, p_raw text DEFAULT NULL::text, p_detail text DEFAULT NULL::text, p_event_key text DEFAULT NULL::text, p_occurred_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(event_id bigint, subtask_id bigint, duplicate boolean, suppressed boolean, cancelled integer)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_ref record;
  v_email text;
  v_event bigint;
  v_suppressed boolean := false;
  v_cancelled integer := 0;
BEGIN
  IF p_kind IS NULL OR p_kind NOT IN ('hard_bounce', 'soft_bounce', 'complaint', 'unsubscribe',
                                      'delivered') THEN
    RAISE EXCEPTION 'feedback kind must be hard_bounce, soft_bounce, complaint, unsubscribe or delivered, got %',
      coalesce(quote_literal(p_kind), 'NULL') USING ERRCODE = 'ED005';
  END IF;
  IF p_source IS NULL OR p_source !~ '^[a-z][a-z0-9_]{0,31}$' THEN
    RAISE EXCEPTION 'feedback source must match [a-z][a-z0-9_]{0,31}' USING ERRCODE = 'ED005';
  END IF;
  IF p_recipient IS NOT NULL AND edm.email_problem(p_recipient) IS NOT NULL THEN
    RAISE EXCEPTION 'invalid recipient %: %', quote_literal(p_recipient),
      edm.email_problem(p_recipient) USING ERRCODE = 'ED005';
  END IF;

  SELECT st.subtask_id, st.task_id, t.user_id, st.service_id, st.email INTO v_ref
  FROM edm.parse_message_id(p_message_id) m
  JOIN edm.subtasks st ON st.subtask_id = m.subtask_id AND st.task_id = m.task_id
  JOIN edm.tasks t ON t.task_id = st.task_id;
  IF v_ref.subtask_id IS NULL AND p_recipient IS NULL THEN
    RAISE EXCEPTION 'no message of edm-sched has Message-ID %, and no recipient was given',
      coalesce(quote_literal(p_message_id), 'NULL') USING ERRCODE = 'ED001';
  END IF;
  v_email := coalesce(v_ref.email, edm.normalize_email(p_recipient));

  INSERT INTO edm.feedback_events AS f (received_at, occurred_at, kind, source, message_id,
                                        recipient, subtask_id, task_id, user_id, service_id,
                                        event_key, detail, raw)
  VALUES (v_now, p_occurred_at, p_kind, p_source, left(p_message_id, 998), v_email,
          v_ref.subtask_id, v_ref.task_id, v_ref.user_id, v_ref.service_id,
          left(p_event_key, 500), left(p_detail, 10000), coalesce(p_raw, ''))
  ON CONFLICT (source, event_key) WHERE event_key IS NOT NULL DO NOTHING
  RETURNING f.event_id INTO v_event;
  IF v_event IS NULL THEN  -- the same provider event again: nothing more to do
    RETURN QUERY SELECT f.event_id, f.subtask_id, true, false, 0 FROM edm.feedback_events f
                 WHERE f.source = p_source AND f.event_key = left(p_event_key, 500);
    RETURN;
  END IF;

  IF p_kind = 'hard_bounce' THEN
    -- the mailbox does not exist: nobody sends to it any more
    INSERT INTO edm.suppressions (user_id, email, reason, source_subtask_id, created_at)
    VALUES (NULL, v_email, 'hard_bounce', v_ref.subtask_id, v_now)
    ON CONFLICT (user_id, email) DO NOTHING;
    v_suppressed := FOUND;
    v_cancelled := edm.cancel_pending_to(v_email, NULL, 'hard bounced', v_now);
  ELSIF p_kind = 'complaint' THEN
    -- the recipient called this sender's mail spam: that user stops mailing
    -- it (everyone, when the message is not known)
    IF v_ref.user_id IS NOT NULL THEN
      UPDATE edm.contacts c SET unsubscribed = true, updated_at = v_now
      WHERE c.user_id = v_ref.user_id AND c.email = v_email AND NOT c.unsubscribed;
    END IF;
    INSERT INTO edm.suppressions (user_id, email, reason, source_subtask_id, created_at)
    VALUES (v_ref.user_id, v_email, 'complaint', v_ref.subtask_id, v_now)
    ON CONFLICT (user_id, email) DO NOTHING;
    v_suppressed := FOUND;
    v_cancelled := edm.cancel_pending_to(v_email, v_ref.user_id, 'complained', v_now);
  ELSIF p_kind = 'unsubscribe' AND v_ref.user_id IS NOT NULL THEN
    SELECT u.suppressed, u.cancelled INTO v_suppressed, v_cancelled
    FROM edm.unsubscribe(v_ref.user_id, v_email, v_ref.subtask_id, v_now) u;
  END IF;
  UPDATE edm.feedback_events f SET suppressed = v_suppressed WHERE f.event_id = v_event;
  RETURN QUERY SELECT v_event, v_ref.subtask_id, false, v_suppressed, v_cancelled;
END;
$function$;
COMMENT ON FUNCTION edm.record_feedback(text,text,text,text,text,text,text,timestamp with time zone,timestamp with time zone) IS 'Records one delivery event (hard_bounce, soft_bounce, complaint, unsubscribe, delivered) for the subtask its edm-sched Message-ID names, keeping the raw source. A hard bounce suppresses the address for everyone; a complaint suppresses it for the task''s user and unsubscribes the contact; an unsubscribe runs edm.unsubscribe; each cancels the pending subtasks it concerns. An unknown Message-ID is recorded when a recipient is given (a hard bounce still suppresses), else refused (ED001). A repeated (source, event_key) is recorded once (duplicate = true).';
REVOKE ALL ON FUNCTION edm.record_feedback(text,text,text,text,text,text,text,timestamp with time zone,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.unsubscribe(p_user_id text, p_email text, p_subtask_id bigint DEFAULT NULL::bigint, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(contact_updated boolean, suppressed boolean, cancelled integer)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_email text := edm.normalize_email(p_email);
  v_contact boolean;
  v_suppressed boolean;
  v_cancelled integer;
BEGIN
  IF edm.email_problem(p_email) IS NOT NULL THEN
    RAISE EXCEPTION 'invalid address %: %', quote_literal(p_email), edm.email_problem(p_email)
      USING ERRCODE = 'ED005';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM edm.users u WHERE u.user_id = p_user_id) THEN
    -- the tenant is gone: nothing of it can be sent any more
    RETURN QUERY SELECT false, false, 0;
    RETURN;
  END IF;
  UPDATE edm.contacts c SET unsubscribed = true, updated_at = coalesce(p_now, now())
  WHERE c.user_id = p_user_id AND c.email = v_email AND NOT c.unsubscribed;
  v_contact := FOUND;
  INSERT INTO edm.suppressions (user_id, email, reason, source_subtask_id, created_at)
  VALUES (p_user_id, v_email, 'unsubscribe', p_subtask_id, coalesce(p_now, now()))
  ON CONFLICT (user_id, email) DO NOTHING;
  v_suppressed := FOUND;
  v_cancelled := edm.cancel_pending_to(v_email, p_user_id, 'unsubscribed', p_now);
  RETURN QUERY SELECT v_contact, v_suppressed, v_cancelled;
END;
$function$;
COMMENT ON FUNCTION edm.unsubscribe(text,text,bigint,timestamp with time zone) IS 'Unsubscribes p_email from user p_user_id''s mail, idempotently: marks the contact unsubscribed, suppresses the address for that user (reason unsubscribe; an existing suppression is kept), and cancels its pending subtasks in the user''s tasks. Returns what changed (all false / 0 on a repeated call, or when the user no longer exists). Called by edm_sched.unsubscribe after it verified the signed token.';
REVOKE ALL ON FUNCTION edm.unsubscribe(text,text,bigint,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.cancel_pending_to(p_email text, p_user_id text DEFAULT NULL::text, p_reason text DEFAULT 'suppressed'::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_ids bigint[];
BEGIN
  -- Lock order as everywhere: subtasks, then tasks by id, then users.
  -- Live tasks first, then one probe of the unique (task_id, email) index
  -- each: subtasks has no index on the address alone (it would cost every
  -- subtask insert), and a scan of it would cost a feedback event seconds.
  SELECT array_agg(x.subtask_id) INTO v_ids FROM (
    SELECT st.subtask_id FROM edm.tasks t
    JOIN edm.subtasks st ON st.task_id = t.task_id AND st.email = edm.normalize_email(p_email)
    WHERE t.status IN ('draft', 'expanding', 'scheduled', 'sending', 'paused')
      AND (p_user_id IS NULL OR t.user_id = p_user_id)
      AND st.status = 'pending'
    ORDER BY st.subtask_id
    FOR NO KEY UPDATE OF st) x;
  IF v_ids IS NULL THEN
    RETURN 0;
  END IF;
  PERFORM 1 FROM edm.tasks t
  WHERE t.task_id IN (SELECT st.task_id FROM edm.subtasks st WHERE st.subtask_id = ANY (v_ids))
  ORDER BY t.task_id FOR NO KEY UPDATE;
  WITH sub AS (
    UPDATE edm.subtasks st
    SET status = 'cancelled', finished_at = v_now,
        outcome_detail = 'not sent: address ' || p_reason
    WHERE st.subtask_id = ANY (v_ids) AND st.status = 'pending'
    RETURNING st.task_id
  ),
  per_task AS (SELECT sub.task_id, count(*) AS n FROM sub GROUP BY sub.task_id),
  upd_tasks AS (
    UPDATE edm.tasks t
    SET pending_count = t.pending_count - pt.n, cancelled_count = t.cancelled_count + pt.n,
        quota_reserved = greatest(t.quota_reserved - pt.n, 0)
        -- a task this drains is completed by trigger tasks_when_drained
    FROM per_task pt WHERE t.task_id = pt.task_id
    RETURNING t.user_id, pt.n
  )
  -- never sent: the reserved quota goes back to the owner, as cancel_task does
  UPDATE edm.users u SET quota_used = greatest(u.quota_used - r.n, 0)
  FROM (SELECT ut.user_id, sum(ut.n) AS n FROM upd_tasks ut GROUP BY ut.user_id) r
  WHERE u.user_id = r.user_id;
  RETURN cardinality(v_ids);
END;
$function$;
COMMENT ON FUNCTION edm.cancel_pending_to(text,text,text,timestamp with time zone) IS 'Cancels the pending subtasks addressed to p_email (of user p_user_id''s tasks, or of every task when NULL), keeping task counters and refunding the owners'' quota, so that a suppression or an unsubscribe takes effect on tasks already created. Leased subtasks finish. Returns how many were cancelled.';
REVOKE ALL ON FUNCTION edm.cancel_pending_to(text,text,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.reputation_rates(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(subject text, service_id bigint, user_id text, window_start timestamp with time zone, sends bigint, hard_bounces bigint, complaints bigint, bounce_pct numeric, complaint_pct numeric, judged boolean, paused_reason text)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
BEGIN ATOMIC
 WITH cfg AS (
          SELECT (COALESCE(reputation_rates.p_now, now()) - make_interval(hours => edm.config_int('reputation.window_hours'::text))) AS since,
             edm.config_int('reputation.min_sends'::text) AS min_sends
         ), subjects AS (
          SELECT 'service'::text AS subject,
             s.service_id,
             NULL::text AS user_id,
             GREATEST(cfg_1.since, s.reputation_since) AS window_start,
             s.paused_reason
            FROM edm.services s,
             cfg cfg_1
         UNION ALL
          SELECT 'user'::text AS subject,
             NULL::bigint AS service_id,
             u.user_id,
             GREATEST(cfg_1.since, u.reputation_since) AS window_start,
             u.paused_reason
            FROM edm.users u,
             cfg cfg_1
         ), svc_sends AS (
          SELECT x.service_id,
             (sum(m.sent))::bigint AS n
            FROM (subjects x
              JOIN edm.metrics_hourly m ON ((m.service_id = x.service_id)))
           WHERE ((x.subject = 'service'::text) AND (m.hour >= ( SELECT (date_trunc('hour'::text, (cfg_1.since AT TIME ZONE 'UTC'::text)) AT TIME ZONE 'UTC'::text) AS timezone
                    FROM cfg cfg_1)) AND (m.hour >= (date_trunc('hour'::text, (x.window_start AT TIME ZONE 'UTC'::text)) AT TIME ZONE 'UTC'::text)))
           GROUP BY x.service_id
         ), usr_sends AS (
          SELECT x.user_id,
             (sum(m.sent))::bigint AS n
            FROM (subjects x
              JOIN edm.metrics_hourly m ON ((m.user_id = x.user_id)))
           WHERE ((x.subject = 'user'::text) AND (m.hour >= ( SELECT (date_trunc('hour'::text, (cfg_1.since AT TIME ZONE 'UTC'::text)) AT TIME ZONE 'UTC'::text) AS timezone
                    FROM cfg cfg_1)) AND (m.hour >= (date_trunc('hour'::text, (x.window_start AT TIME ZONE 'UTC'::text)) AT TIME ZONE 'UTC'::text)))
           GROUP BY x.user_id
         ), svc_fb AS (
          SELECT x.service_id,
             count(*) FILTER (WHERE (f.kind = 'hard_bounce'::text)) AS hb,
             count(*) FILTER (WHERE (f.kind = 'complaint'::text)) AS c
            FROM (subjects x
              JOIN edm.feedback_events f ON ((f.service_id = x.service_id)))
           WHERE ((x.subject = 'service'::text) AND (f.kind = ANY (ARRAY['hard_bounce'::text, 'complaint'::text])) AND (f.received_at >= ( SELECT cfg_1.since
                    FROM cfg cfg_1)) AND (f.received_at >= x.window_start))
           GROUP BY x.service_id
         ), usr_fb AS (
          SELECT x.user_id,
             count(*) FILTER (WHERE (f.kind = 'hard_bounce'::text)) AS hb,
             count(*) FILTER (WHERE (f.kind = 'complaint'::text)) AS c
            FROM (subjects x
              JOIN edm.feedback_events f ON ((f.user_id = x.user_id)))
           WHERE ((x.subject = 'user'::text) AND (f.kind = ANY (ARRAY['hard_bounce'::text, 'complaint'::text])) AND (f.received_at >= ( SELECT cfg_1.since
                    FROM cfg cfg_1)) AND (f.received_at >= x.window_start))
           GROUP BY x.user_id
         ), counted AS (
          SELECT x.subject,
             x.service_id,
             x.user_id,
             x.window_start,
             x.paused_reason,
             COALESCE(ss.n, us.n, (0)::bigint) AS sends,
             COALESCE(sf.hb, uf.hb, (0)::bigint) AS hard_bounces,
             COALESCE(sf.c, uf.c, (0)::bigint) AS complaints
            FROM ((((subjects x
              LEFT JOIN svc_sends ss ON (((x.subject = 'service'::text) AND (ss.service_id = x.service_id))))
              LEFT JOIN usr_sends us ON (((x.subject = 'user'::text) AND (us.user_id = x.user_id))))
              LEFT JOIN svc_fb sf ON (((x.subject = 'service'::text) AND (sf.service_id = x.service_id))))
              LEFT JOIN usr_fb uf ON (((x.subject = 'user'::text) AND (uf.user_id = x.user_id))))
         )
  SELECT c.subject,
     c.service_id,
     c.user_id,
     c.window_start,
     c.sends,
     c.hard_bounces,
     c.complaints,
         CASE
             WHEN (c.sends > 0) THEN round(((100.0 * (c.hard_bounces)::numeric) / (c.sends)::numeric), 3)
             ELSE NULL::numeric
         END AS "case",
         CASE
             WHEN (c.sends > 0) THEN round(((100.0 * (c.complaints)::numeric) / (c.sends)::numeric), 3)
             ELSE NULL::numeric
         END AS "case",
     (c.sends >= cfg.min_sends),
     c.paused_reason
    FROM counted c,
     cfg
   WHERE ((c.sends > 0) OR (c.hard_bounces > 0) OR (c.complaints > 0) OR (c.paused_reason IS NOT NULL));
END;
COMMENT ON FUNCTION edm.reputation_rates(timestamp with time zone) IS 'Per service and per user with activity: sends (from edm.metrics_hourly, whole hours), hard bounces and complaints (edm.feedback_events) in the reputation window (reputation.window_hours, or since the last resume), their rates in percent, and whether the sample is large enough to judge (reputation.min_sends).';
REVOKE ALL ON FUNCTION edm.reputation_rates(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.check_reputation(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone, p_force boolean DEFAULT false)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_window integer := edm.config_int('reputation.window_hours');
  v_bw numeric := edm.config_num('reputation.bounce_warn_pct');
  v_bp numeric := edm.config_num('reputation.bounce_pause_pct');
  v_cw numeric := edm.config_num('reputation.complaint_warn_pct');
  v_cp numeric := edm.config_num('reputation.complaint_pause_pct');
  v_last timestamptz;
  v_n integer := 0;
  v_reason text;
  r record;
BEGIN
  IF NOT (SELECT (c.value #>> '{}')::boolean FROM edm.config c WHERE c.key = 'reputation.enabled') THEN
    RETURN 0;
  END IF;
  -- At most once per reputation.check_interval (the sweeps run every few seconds).
  SELECT s.watermark INTO v_last FROM edm.sweep_state s WHERE s.name = 'reputation' FOR UPDATE;
  IF NOT coalesce(p_force, false)
     AND v_last > v_now - make_interval(secs => edm.config_int('reputation.check_interval')) THEN
    RETURN 0;
  END IF;
  INSERT INTO edm.sweep_state (name, watermark) VALUES ('reputation', v_now)
  ON CONFLICT (name) DO UPDATE SET watermark = EXCLUDED.watermark, updated_at = now();

  -- A service re-enabled by hand (update_service) counts as resumed.
  UPDATE edm.services s SET paused_reason = NULL, reputation_since = v_now
  WHERE s.paused_reason IS NOT NULL AND s.enabled;

  FOR r IN SELECT x.subject, x.service_id, x.user_id, x.sends, x.hard_bounces, x.complaints,
                  x.bounce_pct, x.complaint_pct, x.paused_reason
           FROM edm.reputation_rates(v_now) x WHERE x.judged
           ORDER BY x.subject, x.service_id, x.user_id LOOP
    v_reason := NULL;
    IF r.complaint_pct >= v_cp OR r.bounce_pct >= v_bp THEN
      v_reason := format('reputation: %s%% hard bounces (%s) and %s%% complaints (%s) in %s sends over the last %s h; pauses at %s%% / %s%%',
                         r.bounce_pct, r.hard_bounces, r.complaint_pct, r.complaints, r.sends,
                         v_window, v_bp, v_cp);
    END IF;
    IF v_reason IS NOT NULL AND r.paused_reason IS NULL THEN
      IF r.subject = 'service' THEN
        UPDATE edm.services s SET enabled = false, paused_reason = v_reason, updated_at = v_now
        WHERE s.service_id = r.service_id;
        PERFORM edm.raise_alert('reputation', 'critical',
          format('service %s disabled: %s', r.service_id, v_reason), NULL, r.service_id, NULL, v_now);
      ELSE
        UPDATE edm.users u SET paused_reason = v_reason WHERE u.user_id = r.user_id;
        UPDATE edm.tasks t SET status = 'paused', pause_reason = v_reason
        WHERE t.task_id IN (SELECT x.task_id FROM edm.tasks x
                            WHERE x.user_id = r.user_id AND x.status IN ('scheduled', 'sending')
                              AND edm.is_bulk_task(x.task_id)
                            ORDER BY x.task_id FOR NO KEY UPDATE);
        PERFORM edm.raise_alert('reputation', 'critical',
          format('user %s: bulk tasks paused: %s', r.user_id, v_reason), NULL, NULL, r.user_id, v_now);
      END IF;
      v_n := v_n + 1;
    ELSIF v_reason IS NULL AND (r.complaint_pct >= v_cw OR r.bounce_pct >= v_bw) THEN
      IF edm.raise_alert('reputation', 'warning',
           format('%s %s: %s%% hard bounces (%s) and %s%% complaints (%s) in %s sends over the last %s h; warns at %s%% / %s%%, pauses at %s%% / %s%%',
                  r.subject, coalesce(r.service_id::text, r.user_id), r.bounce_pct, r.hard_bounces,
                  r.complaint_pct, r.complaints, r.sends, v_window, v_bw, v_cw, v_bp, v_cp),
           NULL, r.service_id, r.user_id, v_now) THEN
        v_n := v_n + 1;
      END IF;
    END IF;
  END LOOP;

  -- Warnings whose rates came back under the thresholds are resolved.
  UPDATE edm.alerts a SET resolved_at = v_now
  WHERE a.kind = 'reputation' AND a.severity = 'warning' AND a.resolved_at IS NULL
    AND NOT EXISTS (SELECT 1 FROM edm.reputation_rates(v_now) x
                    WHERE x.judged AND x.service_id IS NOT DISTINCT FROM a.service_id
                      AND x.user_id IS NOT DISTINCT FROM a.user_id
                      AND (x.complaint_pct >= v_cw OR x.bounce_pct >= v_bw));
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.check_reputation(timestamp with time zone,boolean) IS 'The reputation breaker, run from the sweeps at most every reputation.check_interval seconds (p_force: now): for each service and user with at least reputation.min_sends sends in the window, a hard-bounce or complaint rate at or above its pause threshold disables the service (enabled = false, paused_reason) or pauses the user''s bulk tasks (users.paused_reason, tasks.pause_reason; new bulk tasks are held too), with a critical alert; at or above its warning threshold raises a warning alert. Returns the number of pauses and warnings raised.';
REVOKE ALL ON FUNCTION edm.check_reputation(timestamp with time zone,boolean) FROM PUBLIC;

CREATE FUNCTION edm.reputation_resume_service(p_service_id bigint, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_was text;
BEGIN
  SELECT s.paused_reason INTO v_was FROM edm.services s WHERE s.service_id = p_service_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  UPDATE edm.services s
  SET enabled = CASE WHEN v_was IS NOT NULL THEN true ELSE s.enabled END,
      paused_reason = NULL, reputation_since = coalesce(p_now, now()),
      updated_at = coalesce(p_now, now())
  WHERE s.service_id = p_service_id;
  UPDATE edm.alerts a SET resolved_at = coalesce(p_now, now())
  WHERE a.kind = 'reputation' AND a.service_id = p_service_id AND a.resolved_at IS NULL;
  PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
  RETURN v_was IS NOT NULL;
END;
$function$;
COMMENT ON FUNCTION edm.reputation_resume_service(bigint,timestamp with time zone) IS 'Resumes a service the reputation breaker disabled (enabled again, reason cleared) and restarts its reputation window now, so past bounces and complaints no longer count; resolves its reputation alerts. True when it was paused by the breaker.';
REVOKE ALL ON FUNCTION edm.reputation_resume_service(bigint,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.reputation_resume_user(p_user_id text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_task bigint;
  v_n integer := 0;
BEGIN
  PERFORM 1 FROM edm.users u WHERE u.user_id = p_user_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown user %', p_user_id USING ERRCODE = 'ED001';
  END IF;
  UPDATE edm.users u SET paused_reason = NULL, reputation_since = coalesce(p_now, now())
  WHERE u.user_id = p_user_id;
  FOR v_task IN
    SELECT t.task_id FROM edm.tasks t
    WHERE t.user_id = p_user_id AND t.status = 'paused' AND t.pause_reason IS NOT NULL
    ORDER BY t.task_id
  LOOP
    UPDATE edm.tasks t SET pause_reason = NULL WHERE t.task_id = v_task;
    PERFORM edm.resume_task(v_task, p_user_id, p_now);
    v_n := v_n + 1;
  END LOOP;
  UPDATE edm.alerts a SET resolved_at = coalesce(p_now, now())
  WHERE a.kind = 'reputation' AND a.user_id = p_user_id AND a.service_id IS NULL
    AND a.resolved_at IS NULL;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.reputation_resume_user(text,timestamp with time zone) IS 'Resumes a user the reputation breaker paused: clears the reason, restarts its reputation window now, resumes the tasks the breaker paused (not those the host paused) and resolves its reputation alerts. Returns how many tasks were resumed.';
REVOKE ALL ON FUNCTION edm.reputation_resume_user(text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.tasks_reputation_hold()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_reason text;
BEGIN
  SELECT u.paused_reason INTO v_reason FROM edm.users u WHERE u.user_id = NEW.user_id;
  IF v_reason IS NULL OR NOT edm.is_bulk_task(NEW.task_id) THEN
    RETURN NEW;
  END IF;
  IF OLD.status = 'paused' THEN
    RAISE EXCEPTION 'user % is paused by the reputation breaker (%); resume the user first',
      NEW.user_id, v_reason USING ERRCODE = 'ED003';
  END IF;
  -- a bulk task due to start while its user is held: held with it
  NEW.status := 'paused';
  NEW.pause_reason := v_reason;
  RETURN NEW;
END;
$function$;
COMMENT ON FUNCTION edm.tasks_reputation_hold() IS 'Trigger: while the reputation breaker holds a user (users.paused_reason), the user''s bulk tasks that would start sending are paused instead (with the reason), and resuming one of them by hand is refused (ED003) until the user is resumed.';
REVOKE ALL ON FUNCTION edm.tasks_reputation_hold() FROM PUBLIC;

CREATE VIEW edm.reputation_status AS
 SELECT subject,
    service_id,
    user_id,
    window_start,
    sends,
    hard_bounces,
    complaints,
    bounce_pct,
    complaint_pct,
    judged,
    paused_reason
   FROM edm.reputation_rates() r(subject, service_id, user_id, window_start, sends, hard_bounces, complaints, bounce_pct, complaint_pct, judged, paused_reason);
COMMENT ON VIEW edm.reputation_status IS 'The reputation breaker''s view right now: per service and per user, sends, hard bounces and complaints in the window, rates, whether judged, and the pause reason if paused.';
COMMENT ON COLUMN edm.reputation_status.subject IS 'service or user.';
COMMENT ON COLUMN edm.reputation_status.service_id IS 'The service (subject service).';
COMMENT ON COLUMN edm.reputation_status.user_id IS 'The user (subject user).';
COMMENT ON COLUMN edm.reputation_status.window_start IS 'Start of the window: reputation.window_hours ago, or the last resume.';
COMMENT ON COLUMN edm.reputation_status.sends IS 'Messages sent in the window (whole hours).';
COMMENT ON COLUMN edm.reputation_status.hard_bounces IS 'Hard bounces recorded in the window.';
COMMENT ON COLUMN edm.reputation_status.complaints IS 'Complaints recorded in the window.';
COMMENT ON COLUMN edm.reputation_status.bounce_pct IS 'Hard bounces / sends, percent.';
COMMENT ON COLUMN edm.reputation_status.complaint_pct IS 'Complaints / sends, percent.';
COMMENT ON COLUMN edm.reputation_status.judged IS 'True when sends reach reputation.min_sends: only then can the rates raise alerts or pause.';
COMMENT ON COLUMN edm.reputation_status.paused_reason IS 'Why the breaker paused the subject, if it did.';

CREATE TRIGGER tasks_reputation_hold BEFORE UPDATE OF status ON edm.tasks FOR EACH ROW WHEN (((new.status = 'sending'::text) AND (old.status = ANY (ARRAY['scheduled'::text, 'paused'::text])))) EXECUTE FUNCTION edm.tasks_reputation_hold();

-- ==========================================================================
-- Monitoring views
-- What a DBA reads when something looks wrong.
-- ==========================================================================

CREATE FUNCTION edm.task_wait_reason(p_task_id bigint, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(reason text, until timestamp with time zone)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  t edm.tasks;
  u edm.users;
  v_granted integer;
  v_enabled integer;
  v_ready integer;
  v_exhausted integer;
  v_backoff integer;
  v_next_interval timestamptz;
  v_next_quota timestamptz;
  v_next_backoff timestamptz;
  v_next_retry timestamptz;
  v_bind_service text;
  v_bind_limit text;
  v_bind_at timestamptz;
  v_shape record;
BEGIN
  SELECT * INTO t FROM edm.tasks WHERE task_id = p_task_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'ED001';
  END IF;
  SELECT * INTO u FROM edm.users WHERE user_id = t.user_id;
  IF t.status IN ('completed', 'cancelled', 'failed') THEN
    RETURN QUERY SELECT 'finished (' || t.status || ')', t.finished_at; RETURN;
  ELSIF t.status = 'draft' THEN
    IF u.quota_limit IS NOT NULL AND u.quota_used >= u.quota_limit THEN
      RETURN QUERY SELECT 'user quota exhausted', NULL::timestamptz; RETURN;
    END IF;
    RETURN QUERY SELECT 'draft: not submitted', NULL::timestamptz; RETURN;
  ELSIF t.status = 'expanding' THEN
    RETURN QUERY SELECT format('expanding recipients (%s so far)', t.total_count), NULL::timestamptz; RETURN;
  ELSIF t.status = 'paused' THEN
    RETURN QUERY SELECT 'paused', NULL::timestamptz; RETURN;
  ELSIF t.scheduled_at > v_now THEN
    RETURN QUERY SELECT 'scheduled later', t.scheduled_at; RETURN;
  ELSIF t.pending_count = 0 THEN
    RETURN QUERY SELECT 'sending: waiting for in-flight sends to complete', NULL::timestamptz; RETURN;
  END IF;

  -- >>> 0010_adoption: no live dispatcher, no sends (whatever the services say).
  IF edm.live_dispatcher_count(v_now) = 0 THEN
    RETURN QUERY SELECT 'no dispatcher running (no heartbeat in the last 30 s): start edm-sched dispatch',
                        NULL::timestamptz;
    RETURN;
  END IF;
  -- <<< 0010_adoption

  -- >>> 0016_shaping: a global, user or task limit without headroom binds
  -- whatever the services say (the one that frees last is named).
  SELECT x.what, x.name, x.free INTO v_shape
  FROM (SELECT CASE l.scope WHEN 'global' THEN 'global limit'
                            WHEN 'user' THEN format('user limit of %s', t.user_id)
                            ELSE 'task limit' END AS what,
               l.name, edm.limit_next(edm.shaping_as_limit(l), v_now, 'UTC') AS free
        FROM edm.shaping_limits l
        WHERE l.scope_key IN (edm.shaping_key('global', NULL, NULL, NULL, NULL),
                              edm.shaping_key('user', NULL, NULL, t.user_id, NULL),
                              edm.shaping_key('task', NULL, NULL, NULL, t.task_id))) x
  WHERE x.free > v_now
  ORDER BY x.free DESC, x.what, x.name
  LIMIT 1;
  IF FOUND THEN
    RETURN QUERY SELECT format('%s %s: no headroom until %s', v_shape.what, v_shape.name,
                               CASE WHEN v_shape.free = 'infinity' THEN 'it is raised (max_count 0)'
                                    ELSE v_shape.free::text END),
                        CASE WHEN v_shape.free < 'infinity' THEN v_shape.free END;
    RETURN;
  END IF;
  -- <<< 0016_shaping

  SELECT count(*), count(*) FILTER (WHERE s.enabled),
         count(*) FILTER (WHERE edm.service_is_ready(s, v_now)),
         count(*) FILTER (WHERE s.enabled AND (s.daily_quota = 0
                            OR edm.service_sent_today(s, v_now) >= s.daily_quota)),
         count(*) FILTER (WHERE s.enabled AND s.backoff_until > v_now),
         min(edm.ts_add_ms(s.last_sent_at, s.interval_ms)) FILTER (WHERE s.enabled),
         min(coalesce(s.quota_exhausted_until, edm.service_next_quota_day(s.quota_tz, v_now)))
           FILTER (WHERE s.enabled AND s.daily_quota > 0
                   AND edm.service_sent_today(s, v_now) >= s.daily_quota),
         min(s.backoff_until) FILTER (WHERE s.enabled AND s.backoff_until > v_now)
  INTO v_granted, v_enabled, v_ready, v_exhausted, v_backoff, v_next_interval, v_next_quota,
       v_next_backoff
  FROM edm.grants g JOIN edm.services s ON s.service_id = g.service_id
  WHERE g.user_id = t.user_id;

  SELECT min(st.not_before) INTO v_next_retry FROM edm.subtasks st
  WHERE st.task_id = t.task_id AND st.status = 'pending';

  IF v_granted = 0 THEN
    RETURN QUERY SELECT 'no granted service', NULL::timestamptz;
  ELSIF v_enabled = 0 THEN
    RETURN QUERY SELECT 'all granted services disabled', NULL::timestamptz;
  ELSIF v_next_retry > v_now THEN
    RETURN QUERY SELECT 'retries waiting for their back-off', v_next_retry;
  ELSIF v_ready > 0 THEN
    -- >>> 0016_shaping: every site of the task's next recipients held back
    -- (suspended or without headroom on each granted service) binds.
    SELECT r.reason, r.until INTO v_shape FROM edm.task_site_wait(p_task_id, v_now) r;
    IF FOUND THEN
      RETURN QUERY SELECT v_shape.reason, v_shape.until;
      RETURN;
    END IF;
    -- <<< 0016_shaping
    RETURN QUERY SELECT 'in rotation: a granted service is ready; waiting for its turn among users',
                        NULL::timestamptz;
  ELSIF v_exhausted = v_enabled THEN
    RETURN QUERY SELECT 'service quotas exhausted', v_next_quota;
  ELSIF v_backoff + v_exhausted = v_enabled THEN
    RETURN QUERY SELECT 'granted services unhealthy (backing off)', least(v_next_backoff, v_next_quota);
  ELSE
    -- Name the limit that binds (0008): on the granted service that frees first.
    SELECT s.name, b.limit_name, b.free_at INTO v_bind_service, v_bind_limit, v_bind_at
    FROM edm.grants g JOIN edm.services s ON s.service_id = g.service_id
    CROSS JOIN LATERAL edm.service_binding_limit(s, v_now) b
    WHERE g.user_id = t.user_id AND s.enabled
      AND (s.backoff_until IS NULL OR s.backoff_until <= v_now)
    ORDER BY b.free_at, s.service_id
    LIMIT 1;
    IF v_bind_limit IS NULL THEN
      RETURN QUERY SELECT 'all granted services throttled', v_next_interval;
    ELSE
      RETURN QUERY SELECT format('all granted services throttled: first to free is %s, held by its %s limit',
                                 v_bind_service, v_bind_limit), v_bind_at;
    END IF;
  END IF;
END;
$function$;
COMMENT ON FUNCTION edm.task_wait_reason(bigint,timestamp with time zone) IS 'Why task p_task_id is not sending right now, and until when if known: scheduled later, paused, expanding, no dispatcher running (no live heartbeat, see edm.live_dispatcher_count), a global, user or task limit without headroom until T (edm.shaping_limits, naming the limit), sites held back (the sites of its next recipients suspended or limited on every granted service, see edm.task_site_wait), no granted service, all granted services disabled, throttled until T (naming the service that frees first and its binding limit: interval, daily_quota or an extra limit of edm.service_limits), quotas exhausted until T, backing off until T, retries in back-off until T, user quota exhausted, or in rotation.';
REVOKE ALL ON FUNCTION edm.task_wait_reason(bigint,timestamp with time zone) FROM PUBLIC;

CREATE VIEW edm.task_progress AS
 SELECT task_id,
    user_id,
    name,
    status,
    priority,
    scheduled_at,
    total_count AS total,
    sent_count AS sent,
    pending_count AS pending,
    leased_count AS leased,
    failed_count AS failed,
    cancelled_count AS cancelled,
        CASE
            WHEN (total_count = 0) THEN 100.0
            ELSE round(((100.0 * (((sent_count + failed_count) + cancelled_count))::numeric) / (total_count)::numeric), 1)
        END AS progress_pct,
    (EXTRACT(epoch FROM (COALESCE(first_claimed_at, GREATEST(now(), scheduled_at)) - scheduled_at)))::double precision AS first_send_wait_s,
        CASE
            WHEN ((sent_count > 0) AND (last_activity_at > first_claimed_at)) THEN ((sent_count)::double precision / (EXTRACT(epoch FROM (last_activity_at - first_claimed_at)))::double precision)
            ELSE NULL::double precision
        END AS sends_per_s,
        CASE
            WHEN ((pending_count + leased_count) = 0) THEN (0.0)::double precision
            WHEN ((sent_count > 0) AND (last_activity_at > first_claimed_at)) THEN (((pending_count + leased_count))::double precision / ((sent_count)::double precision / (EXTRACT(epoch FROM (last_activity_at - first_claimed_at)))::double precision))
            ELSE NULL::double precision
        END AS eta_s,
    last_activity_at,
    stuck_since,
        CASE
            WHEN (total_count > 0) THEN trunc(((100.0 * (sent_count)::numeric) / (total_count)::numeric), 1)
            ELSE NULL::numeric
        END AS sent_pct,
        CASE
            WHEN (status = 'cancelled'::text) THEN format('cancelled: %s sent, %s failed, %s cancelled'::text, sent_count, failed_count, cancelled_count)
            WHEN (status = 'failed'::text) THEN ('failed: '::text || COALESCE(error, 'see the task''s error'::text))
            WHEN (status <> 'completed'::text) THEN NULL::text
            WHEN (total_count = 0) THEN 'no recipients'::text
            WHEN ((failed_count = 0) AND (cancelled_count = 0)) THEN 'all sent'::text
            WHEN (sent_count = 0) THEN format('none sent: %s failed, %s cancelled'::text, failed_count, cancelled_count)
            ELSE format('partly sent: %s sent, %s failed, %s cancelled'::text, sent_count, failed_count, cancelled_count)
        END AS outcome
   FROM edm.tasks t;
COMMENT ON VIEW edm.task_progress IS 'Per task: progress (total, sent, pending, leased, failed, cancelled, finished and sent percent, outcome), first-send wait (so far, if still waiting), average throughput, ETA at that rate, last activity, stuck flag.';
COMMENT ON COLUMN edm.task_progress.task_id IS 'Task.';
COMMENT ON COLUMN edm.task_progress.user_id IS 'Owner.';
COMMENT ON COLUMN edm.task_progress.name IS 'Campaign name.';
COMMENT ON COLUMN edm.task_progress.status IS 'Task status.';
COMMENT ON COLUMN edm.task_progress.priority IS 'Task priority.';
COMMENT ON COLUMN edm.task_progress.scheduled_at IS 'Start time.';
COMMENT ON COLUMN edm.task_progress.total IS 'Recipients.';
COMMENT ON COLUMN edm.task_progress.sent IS 'Sent.';
COMMENT ON COLUMN edm.task_progress.pending IS 'Waiting to be claimed.';
COMMENT ON COLUMN edm.task_progress.leased IS 'Being sent.';
COMMENT ON COLUMN edm.task_progress.failed IS 'Failed permanently.';
COMMENT ON COLUMN edm.task_progress.cancelled IS 'Cancelled.';
COMMENT ON COLUMN edm.task_progress.progress_pct IS 'Finished share (sent, failed or cancelled), percent: 100 when nothing is left to do, whatever the outcome; see sent_pct and outcome.';
COMMENT ON COLUMN edm.task_progress.first_send_wait_s IS 'Seconds from scheduled_at to the first claim (or to now while waiting).';
COMMENT ON COLUMN edm.task_progress.sends_per_s IS 'Average sends per second since the first claim.';
COMMENT ON COLUMN edm.task_progress.eta_s IS 'Seconds left at the average rate (NULL before any send).';
COMMENT ON COLUMN edm.task_progress.last_activity_at IS 'Latest claim or completion.';
COMMENT ON COLUMN edm.task_progress.stuck_since IS 'When the sweep flagged the task as stuck.';
COMMENT ON COLUMN edm.task_progress.sent_pct IS 'Sent share of the recipients, percent, rounded down (never 100 while one failed or was cancelled); NULL without recipients.';
COMMENT ON COLUMN edm.task_progress.outcome IS 'For a finished task: all sent, partly sent, none sent (with the failed and cancelled counts), cancelled (with the sent, failed and cancelled counts), failed (with the error) or no recipients. NULL while the task is live.';

CREATE VIEW edm.service_status AS
 SELECT service_id,
    name,
    transport,
    enabled,
        CASE
            WHEN (NOT enabled) THEN 'disabled'::text
            WHEN ((daily_quota = 0) OR (edm.service_sent_today(s.*) >= daily_quota) OR (quota_exhausted_until > now())) THEN 'exhausted'::text
            WHEN (backoff_until > now()) THEN 'unhealthy'::text
            WHEN (next_available_at > now()) THEN 'throttled'::text
            ELSE 'ready'::text
        END AS state,
    NULLIF(next_available_at, '-infinity'::timestamp with time zone) AS next_available_at,
    interval_ms,
    daily_quota,
    edm.service_sent_today(s.*) AS sent_today,
        CASE
            WHEN (daily_quota = 0) THEN 100.0
            ELSE round(((100.0 * (edm.service_sent_today(s.*))::numeric) / (daily_quota)::numeric), 1)
        END AS quota_used_pct,
    ( SELECT count(*) AS count
           FROM edm.send_events e
          WHERE ((e.service_id = s.service_id) AND (e.kind = 'sent'::text) AND (e.occurred_at >= (now() - '01:00:00'::interval)))) AS sent_last_hour,
    success_rate,
    avg_response_ms,
    health,
    consecutive_failures,
    backoff_until,
    last_error,
    total_sent,
    total_failed
   FROM edm.services s;
COMMENT ON VIEW edm.service_status IS 'Per service: ready, throttled (interval), exhausted (daily quota), unhealthy (backing off) or disabled; sends in the last hour, quota used, success rate, average response time, last error.';
COMMENT ON COLUMN edm.service_status.service_id IS 'Service.';
COMMENT ON COLUMN edm.service_status.name IS 'Service name.';
COMMENT ON COLUMN edm.service_status.transport IS 'Transport kind.';
COMMENT ON COLUMN edm.service_status.enabled IS 'Enabled flag.';
COMMENT ON COLUMN edm.service_status.state IS 'ready, throttled, exhausted, unhealthy or disabled.';
COMMENT ON COLUMN edm.service_status.next_available_at IS 'Earliest next send start; NULL when nothing holds the service back.';
COMMENT ON COLUMN edm.service_status.interval_ms IS 'Interval between send starts (ms).';
COMMENT ON COLUMN edm.service_status.daily_quota IS 'Daily quota.';
COMMENT ON COLUMN edm.service_status.sent_today IS 'Send starts in the current quota day.';
COMMENT ON COLUMN edm.service_status.quota_used_pct IS 'Share of the daily quota used, percent.';
COMMENT ON COLUMN edm.service_status.sent_last_hour IS 'Messages sent in the last hour.';
COMMENT ON COLUMN edm.service_status.success_rate IS 'All-time success rate.';
COMMENT ON COLUMN edm.service_status.avg_response_ms IS 'Weighted mean response time (ms).';
COMMENT ON COLUMN edm.service_status.health IS 'healthy, degraded or backoff.';
COMMENT ON COLUMN edm.service_status.consecutive_failures IS 'Service-level failures in a row.';
COMMENT ON COLUMN edm.service_status.backoff_until IS 'Backing off until then.';
COMMENT ON COLUMN edm.service_status.last_error IS 'Last service-level error.';
COMMENT ON COLUMN edm.service_status.total_sent IS 'Sent, all time.';
COMMENT ON COLUMN edm.service_status.total_failed IS 'Failed attempts, all time.';

CREATE VIEW edm.system_health AS
 SELECT ( SELECT count(*) AS count
           FROM edm.services) AS services_total,
    ( SELECT count(*) AS count
           FROM edm.services s
          WHERE s.enabled) AS services_enabled,
    ( SELECT count(*) AS count
           FROM edm.services s
          WHERE edm.service_is_ready(s.*)) AS services_available,
    ( SELECT count(DISTINCT e.service_id) AS count
           FROM edm.send_events e
          WHERE ((e.occurred_at >= (now() - '00:01:00'::interval)) AND (e.kind = 'sent'::text))) AS services_active_last_minute,
    ( SELECT COALESCE(sum(t.pending_count), (0)::bigint) AS "coalesce"
           FROM edm.tasks t
          WHERE (t.status = ANY (ARRAY['scheduled'::text, 'sending'::text, 'paused'::text]))) AS pending_subtasks,
    ( SELECT COALESCE(sum(t.leased_count), (0)::bigint) AS "coalesce"
           FROM edm.tasks t) AS leased_subtasks,
    ( SELECT count(*) AS count
           FROM edm.tasks t
          WHERE (t.status = ANY (ARRAY['scheduled'::text, 'sending'::text]))) AS active_tasks,
    ( SELECT count(*) AS count
           FROM edm.send_events e
          WHERE ((e.occurred_at >= (now() - '00:01:00'::interval)) AND (e.kind = 'sent'::text))) AS sent_last_minute,
    ( SELECT
                CASE
                    WHEN (count(*) = 0) THEN 0.0
                    ELSE round((((count(*) FILTER (WHERE (e.kind = ANY (ARRAY['failed'::text, 'retry'::text, 'service_failure'::text]))))::numeric * 1.0) / (count(*))::numeric), 4)
                END AS round
           FROM edm.send_events e
          WHERE ((e.occurred_at >= (now() - '01:00:00'::interval)) AND (e.kind = ANY (ARRAY['sent'::text, 'failed'::text, 'retry'::text, 'service_failure'::text])))) AS error_rate_last_hour,
    ( SELECT count(*) AS count
           FROM edm.alerts a
          WHERE (a.resolved_at IS NULL)) AS open_alerts,
    ( SELECT count(*) AS count
           FROM edm.dispatchers d
          WHERE ((d.stopped_at IS NULL) AND (d.heartbeat_at > (now() - '00:00:30'::interval)))) AS dispatchers_alive;
COMMENT ON VIEW edm.system_health IS 'One row: services total / enabled / available now / active in the last minute (utilisation), queue sizes, active tasks, throughput and error rate, open alerts, live dispatchers.';
COMMENT ON COLUMN edm.system_health.services_total IS 'Services.';
COMMENT ON COLUMN edm.system_health.services_enabled IS 'Enabled services.';
COMMENT ON COLUMN edm.system_health.services_available IS 'Services ready to send right now.';
COMMENT ON COLUMN edm.system_health.services_active_last_minute IS 'Services that sent in the last minute.';
COMMENT ON COLUMN edm.system_health.pending_subtasks IS 'Subtasks waiting (in scheduled, sending or paused tasks).';
COMMENT ON COLUMN edm.system_health.leased_subtasks IS 'Subtasks being sent.';
COMMENT ON COLUMN edm.system_health.active_tasks IS 'Tasks scheduled or sending.';
COMMENT ON COLUMN edm.system_health.sent_last_minute IS 'Messages sent in the last minute.';
COMMENT ON COLUMN edm.system_health.error_rate_last_hour IS 'Failed, retried or service-failed attempts over all attempts in the last hour.';
COMMENT ON COLUMN edm.system_health.open_alerts IS 'Alerts not resolved.';
COMMENT ON COLUMN edm.system_health.dispatchers_alive IS 'Dispatchers with a heartbeat in the last 30 s.';

CREATE VIEW edm.task_wait_reasons AS
 SELECT t.task_id,
    t.user_id,
    t.name,
    t.status,
    r.reason,
    r.until
   FROM (edm.tasks t
     CROSS JOIN LATERAL edm.task_wait_reason(t.task_id) r(reason, until))
  WHERE ((t.status = ANY (ARRAY['draft'::text, 'expanding'::text, 'scheduled'::text, 'sending'::text, 'paused'::text])) AND ((t.pending_count > 0) OR (t.status = ANY (ARRAY['draft'::text, 'expanding'::text]))));
COMMENT ON VIEW edm.task_wait_reasons IS 'For each task with work waiting: why it is not being sent right now and until when (see edm.task_wait_reason).';
COMMENT ON COLUMN edm.task_wait_reasons.task_id IS 'Task.';
COMMENT ON COLUMN edm.task_wait_reasons.user_id IS 'Owner.';
COMMENT ON COLUMN edm.task_wait_reasons.name IS 'Campaign name.';
COMMENT ON COLUMN edm.task_wait_reasons.status IS 'Task status.';
COMMENT ON COLUMN edm.task_wait_reasons.reason IS 'Why it waits.';
COMMENT ON COLUMN edm.task_wait_reasons.until IS 'When the reason ends, if known.';

CREATE VIEW edm.possible_duplicates AS
 SELECT st.subtask_id,
    st.task_id,
    t.user_id,
    st.email,
    st.status,
    st.service_id,
    st.lease_expiries,
    st.uncertain_sends,
    (st.lease_expiries + st.uncertain_sends) AS uncertain_attempts
   FROM (edm.subtasks st
     JOIN edm.tasks t ON ((t.task_id = st.task_id)))
  WHERE ((st.lease_expiries > 0) OR (st.uncertain_sends > 0));
COMMENT ON VIEW edm.possible_duplicates IS 'Every subtask that may have reached its recipient more than once (I1): one of its attempts ended with an outcome nobody can know, a lease that expired on a crashed or cut-off dispatcher (lease_expiries) or a connection lost after the final dot (uncertain_sends), and it was or may be sent again. Each such attempt was recorded (send_events kinds lease_expired and uncertain) before any resend.';
COMMENT ON COLUMN edm.possible_duplicates.subtask_id IS 'Subtask.';
COMMENT ON COLUMN edm.possible_duplicates.task_id IS 'Task.';
COMMENT ON COLUMN edm.possible_duplicates.user_id IS 'Owner of the task.';
COMMENT ON COLUMN edm.possible_duplicates.email IS 'Recipient.';
COMMENT ON COLUMN edm.possible_duplicates.status IS 'Current status of the subtask.';
COMMENT ON COLUMN edm.possible_duplicates.service_id IS 'Service of the latest attempt.';
COMMENT ON COLUMN edm.possible_duplicates.lease_expiries IS 'Leases that expired (outcome unknown).';
COMMENT ON COLUMN edm.possible_duplicates.uncertain_sends IS 'Connections lost after the final dot.';
COMMENT ON COLUMN edm.possible_duplicates.uncertain_attempts IS 'lease_expiries + uncertain_sends: the most extra copies the recipient may have.';

-- ==========================================================================
-- Recurring jobs
-- Cron-scheduled jobs on the same database (see docs/jobs.md).
-- ==========================================================================

CREATE FUNCTION edm.job_retry_on_ok(p_kinds text[])
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ((cardinality(p_kinds) <= 50) AND (NOT (EXISTS (SELECT 1 FROM unnest(job_retry_on_ok.p_kinds) k(k) WHERE ((k.k IS NULL) OR (NOT ((k.k = ANY (ARRAY['timeout'::text, 'connection'::text, 'http_status'::text, 'unexpected_status'::text, 'exception'::text, 'exit_status'::text, 'lost'::text])) OR (k.k ~ '^[A-Z][A-Za-z0-9_]{0,99}$'::text))))))));
COMMENT ON FUNCTION edm.job_retry_on_ok(text[]) IS 'True when every entry of a retry_on list is a retryable error kind (timeout, connection, http_status, unexpected_status, exception, exit_status, lost) or a Python exception class name.';
REVOKE ALL ON FUNCTION edm.job_retry_on_ok(text[]) FROM PUBLIC;

CREATE FUNCTION edm.job_tags_ok(p_tags text[])
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN ((cardinality(p_tags) <= 50) AND (NOT (EXISTS (SELECT 1 FROM unnest(job_tags_ok.p_tags) t(t) WHERE ((t.t IS NULL) OR ((length(t.t) < 1) OR (length(t.t) > 100)) OR (t.t ~ '[[:cntrl:]]'::text))))));
COMMENT ON FUNCTION edm.job_tags_ok(text[]) IS 'True when a job''s tags are at most 50 non-empty strings of at most 100 characters without control characters.';
REVOKE ALL ON FUNCTION edm.job_tags_ok(text[]) FROM PUBLIC;

CREATE TABLE edm.jobs (
  job_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  user_id text,
  name text NOT NULL,
  description text,
  kind text NOT NULL,
  target jsonb NOT NULL,
  cron_expr text NOT NULL,
  timezone text DEFAULT 'UTC'::text NOT NULL,
  start_at timestamp with time zone,
  end_at timestamp with time zone,
  max_executions bigint,
  status text DEFAULT 'active'::text NOT NULL,
  inactive_reason text,
  priority integer DEFAULT 0 NOT NULL,
  max_concurrent integer DEFAULT 1 NOT NULL,
  timeout_seconds integer DEFAULT 300 NOT NULL,
  max_retries integer DEFAULT 0 NOT NULL,
  retry_delay_seconds double precision DEFAULT 60 NOT NULL,
  retry_backoff double precision DEFAULT 2 NOT NULL,
  retry_max_delay_seconds double precision DEFAULT 3600 NOT NULL,
  retry_on text[] DEFAULT '{timeout,connection,http_status,exception,exit_status,lost}'::text[] NOT NULL,
  misfire_policy text DEFAULT 'run_once'::text NOT NULL,
  misfire_grace_seconds integer DEFAULT 60 NOT NULL,
  tags text[] DEFAULT '{}'::text[] NOT NULL,
  next_run_at timestamp with time zone,
  last_scheduled_for timestamp with time zone,
  last_fired_at timestamp with time zone,
  last_finished_at timestamp with time zone,
  last_status text,
  run_count bigint DEFAULT 0 NOT NULL,
  running_count integer DEFAULT 0 NOT NULL,
  success_count bigint DEFAULT 0 NOT NULL,
  failure_count bigint DEFAULT 0 NOT NULL,
  misfire_count bigint DEFAULT 0 NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT jobs_pkey PRIMARY KEY (job_id),
  CONSTRAINT jobs_user_name_unique UNIQUE NULLS NOT DISTINCT (user_id, name),
  CONSTRAINT jobs_active_has_next_run CHECK (((status = 'active'::text) = (next_run_at IS NOT NULL))),
  CONSTRAINT jobs_check CHECK (((jsonb_typeof(target) = 'object'::text) AND ((target ->> 'kind'::text) = kind) AND (pg_column_size(target) <= 65536))),
  CONSTRAINT jobs_cron_expr_check CHECK ((((length(cron_expr) >= 1) AND (length(cron_expr) <= 200)) AND (cron_expr !~ '[[:cntrl:]]'::text))),
  CONSTRAINT jobs_dates_ordered CHECK (((end_at IS NULL) OR (start_at IS NULL) OR (end_at > start_at))),
  CONSTRAINT jobs_description_check CHECK ((length(description) <= 2000)),
  CONSTRAINT jobs_failure_count_check CHECK ((failure_count >= 0)),
  CONSTRAINT jobs_inactive_has_reason CHECK (((status = 'inactive'::text) = (inactive_reason IS NOT NULL))),
  CONSTRAINT jobs_inactive_reason_check CHECK ((length(inactive_reason) <= 500)),
  CONSTRAINT jobs_kind_check CHECK ((kind = ANY (ARRAY['function'::text, 'http'::text, 'shell'::text, 'launch_campaign'::text]))),
  CONSTRAINT jobs_max_concurrent_check CHECK (((max_concurrent >= 1) AND (max_concurrent <= 1000))),
  CONSTRAINT jobs_max_executions_check CHECK ((max_executions > 0)),
  CONSTRAINT jobs_max_retries_check CHECK (((max_retries >= 0) AND (max_retries <= 100))),
  CONSTRAINT jobs_misfire_count_check CHECK ((misfire_count >= 0)),
  CONSTRAINT jobs_misfire_grace_seconds_check CHECK (((misfire_grace_seconds >= 0) AND (misfire_grace_seconds <= 86400))),
  CONSTRAINT jobs_misfire_policy_check CHECK ((misfire_policy = ANY (ARRAY['run_once'::text, 'skip'::text, 'run_all'::text]))),
  CONSTRAINT jobs_name_check CHECK ((((length(name) >= 1) AND (length(name) <= 200)) AND (name !~ '[[:cntrl:]]'::text))),
  CONSTRAINT jobs_priority_check CHECK (((priority >= '-100'::integer) AND (priority <= 100))),
  CONSTRAINT jobs_retry_backoff_check CHECK (((retry_backoff >= (1)::double precision) AND (retry_backoff <= (10)::double precision))),
  CONSTRAINT jobs_retry_delay_seconds_check CHECK (((retry_delay_seconds >= (0)::double precision) AND (retry_delay_seconds <= (86400)::double precision))),
  CONSTRAINT jobs_retry_max_delay_seconds_check CHECK (((retry_max_delay_seconds >= (0)::double precision) AND (retry_max_delay_seconds <= (604800)::double precision))),
  CONSTRAINT jobs_retry_on_check CHECK (edm.job_retry_on_ok(retry_on)),
  CONSTRAINT jobs_run_count_check CHECK ((run_count >= 0)),
  CONSTRAINT jobs_running_count_check CHECK ((running_count >= 0)),
  CONSTRAINT jobs_status_check CHECK ((status = ANY (ARRAY['active'::text, 'paused'::text, 'inactive'::text]))),
  CONSTRAINT jobs_success_count_check CHECK ((success_count >= 0)),
  CONSTRAINT jobs_tags_check CHECK (edm.job_tags_ok(tags)),
  CONSTRAINT jobs_timeout_seconds_check CHECK (((timeout_seconds >= 1) AND (timeout_seconds <= 86400))),
  CONSTRAINT jobs_timezone_check CHECK (edm.is_valid_timezone(timezone)),
  CONSTRAINT jobs_user_id_check CHECK ((((length(user_id) >= 1) AND (length(user_id) <= 128)) AND (user_id !~ '[[:cntrl:]]'::text)))
);
COMMENT ON TABLE edm.jobs IS 'Recurring jobs: a cron schedule in a time zone and what to run. next_run_at is computed by edm-sched in Python (cronsim) and stored; an active job always has one. Change jobs through the Python API or CLI so next_run_at is recomputed; see docs/jobs.md.';
COMMENT ON COLUMN edm.jobs.job_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.jobs.user_id IS 'Owning user (the host''s user id, as edm.users.user_id), NULL for platform jobs. Limited by jobs.max_jobs_per_user. Called tenant_id before 0021.';
COMMENT ON COLUMN edm.jobs.name IS 'Name, unique per user.';
COMMENT ON COLUMN edm.jobs.description IS 'Free text for people.';
COMMENT ON COLUMN edm.jobs.kind IS 'function (host-registered Python callable), http, shell or launch_campaign.';
COMMENT ON COLUMN edm.jobs.target IS 'What to run, as JSON with a "kind" equal to the kind column: {"kind":"function","function":name,"args":{}}, an HTTP request, a shell command, or a campaign definition. Never an import path: functions are looked up in the host''s registry.';
COMMENT ON COLUMN edm.jobs.cron_expr IS 'Cron expression: 5 fields (minute hour day month weekday) or 6 with leading seconds; @hourly, @daily, @weekly, @monthly, @yearly are accepted. Validated by cronsim in Python.';
COMMENT ON COLUMN edm.jobs.timezone IS 'Time zone the cron fields are read in (IANA name); DST rules in docs/jobs.md.';
COMMENT ON COLUMN edm.jobs.start_at IS 'No run is scheduled before this instant (NULL: from creation).';
COMMENT ON COLUMN edm.jobs.end_at IS 'No run is scheduled after this instant; the job then becomes inactive.';
COMMENT ON COLUMN edm.jobs.max_executions IS 'Most scheduled occurrences fired (manual runs and retries not counted); the job then becomes inactive.';
COMMENT ON COLUMN edm.jobs.status IS 'active (fires), paused (kept, no scheduled runs, queued retries held) or inactive (stopped, ended or exhausted; see inactive_reason).';
COMMENT ON COLUMN edm.jobs.inactive_reason IS 'Why the job is inactive: stopped, end_at reached, max_executions reached, invalid schedule. NULL unless inactive.';
COMMENT ON COLUMN edm.jobs.priority IS 'Higher first when runners have fewer free slots than due executions (-100..100). Copied to executions when queued.';
COMMENT ON COLUMN edm.jobs.max_concurrent IS 'Most executions of this job running at once; a scheduled run that finds this many pending or running is recorded as skipped (JOB_ALREADY_RUNNING).';
COMMENT ON COLUMN edm.jobs.timeout_seconds IS 'Longest run; a run still going is stopped (process killed, or told to stop) and recorded as timed_out.';
COMMENT ON COLUMN edm.jobs.max_retries IS 'Retries of a failed run (0 = none).';
COMMENT ON COLUMN edm.jobs.retry_delay_seconds IS 'Delay before the first retry.';
COMMENT ON COLUMN edm.jobs.retry_backoff IS 'Multiplier of the delay for each further retry (1 = constant delay, 2 = doubling).';
COMMENT ON COLUMN edm.jobs.retry_max_delay_seconds IS 'Cap on the retry delay.';
COMMENT ON COLUMN edm.jobs.retry_on IS 'Error kinds (and Python exception class names) that are retried; config errors, permanent errors and cancellations never are.';
COMMENT ON COLUMN edm.jobs.misfire_policy IS 'What to do with occurrences missed by more than misfire_grace_seconds (downtime): run_once (one catch-up run), skip, or run_all (each missed time, up to jobs.max_catchup_runs).';
COMMENT ON COLUMN edm.jobs.misfire_grace_seconds IS 'An occurrence fired at most this late is on time, not a misfire.';
COMMENT ON COLUMN edm.jobs.tags IS 'Free labels for filtering.';
COMMENT ON COLUMN edm.jobs.next_run_at IS 'Next scheduled occurrence (UTC instant), computed in Python with cronsim; NULL unless active. Runners fire jobs with next_run_at <= now.';
COMMENT ON COLUMN edm.jobs.last_scheduled_for IS 'Latest occurrence fired.';
COMMENT ON COLUMN edm.jobs.last_fired_at IS 'When a runner last fired this job.';
COMMENT ON COLUMN edm.jobs.last_finished_at IS 'When an execution of this job last finished.';
COMMENT ON COLUMN edm.jobs.last_status IS 'Status of the latest finished execution.';
COMMENT ON COLUMN edm.jobs.run_count IS 'Scheduled occurrences fired so far (run or skipped); compared with max_executions.';
COMMENT ON COLUMN edm.jobs.running_count IS 'Executions running now: the slots of max_concurrent in use. Maintained by claim, finish, cancel and the lease sweep.';
COMMENT ON COLUMN edm.jobs.success_count IS 'Executions that succeeded, all time.';
COMMENT ON COLUMN edm.jobs.failure_count IS 'Executions that failed or timed out, all time.';
COMMENT ON COLUMN edm.jobs.misfire_count IS 'Occurrences not run because of a misfire (skip and run_once policies, run_all beyond its cap).';
COMMENT ON COLUMN edm.jobs.created_at IS 'When the job was created.';
COMMENT ON COLUMN edm.jobs.updated_at IS 'When the job''s settings or status last changed.';
CREATE INDEX jobs_due_idx ON edm.jobs USING btree (next_run_at) WHERE (status = 'active'::text);
COMMENT ON INDEX edm.jobs_due_idx IS 'Due jobs by next run: the firing scan and the runners'' wake-up time.';
CREATE INDEX jobs_tags_idx ON edm.jobs USING gin (tags);
COMMENT ON INDEX edm.jobs_tags_idx IS 'Jobs by tag.';
CREATE INDEX jobs_user_idx ON edm.jobs USING btree (user_id, job_id);
COMMENT ON INDEX edm.jobs_user_idx IS 'A user''s jobs (listing, quota count).';

CREATE TABLE edm.job_executions (
  execution_id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  job_id bigint NOT NULL,
  user_id text,
  trigger text NOT NULL,
  status text DEFAULT 'pending'::text NOT NULL,
  priority integer DEFAULT 0 NOT NULL,
  scheduled_for timestamp with time zone,
  run_after timestamp with time zone NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  started_at timestamp with time zone,
  finished_at timestamp with time zone,
  duration_ms bigint GENERATED ALWAYS AS (((EXTRACT(epoch FROM (finished_at - started_at)) * (1000)::numeric))::bigint) STORED,
  progress real,
  progress_message text,
  result jsonb,
  error text,
  error_kind text,
  error_type text,
  error_code text,
  error_stack text,
  retry_count integer DEFAULT 0 NOT NULL,
  retry_of bigint,
  worker_id text,
  lease_expires_at timestamp with time zone,
  cancel_requested_at timestamp with time zone,
  CONSTRAINT job_executions_pkey PRIMARY KEY (execution_id),
  CONSTRAINT job_executions_job_id_fkey FOREIGN KEY (job_id) REFERENCES edm.jobs(job_id) ON DELETE CASCADE,
  CONSTRAINT job_executions_error_check CHECK ((length(error) <= 4000)),
  CONSTRAINT job_executions_error_code_check CHECK ((length(error_code) <= 100)),
  CONSTRAINT job_executions_error_kind_check CHECK ((length(error_kind) <= 100)),
  CONSTRAINT job_executions_error_stack_check CHECK ((length(error_stack) <= 20000)),
  CONSTRAINT job_executions_error_type_check CHECK ((length(error_type) <= 200)),
  CONSTRAINT job_executions_finished_iff_done CHECK (((status = ANY (ARRAY['succeeded'::text, 'failed'::text, 'timed_out'::text, 'cancelled'::text, 'skipped'::text])) = (finished_at IS NOT NULL))),
  CONSTRAINT job_executions_lease_iff_running CHECK (((status = 'running'::text) = (lease_expires_at IS NOT NULL))),
  CONSTRAINT job_executions_progress_check CHECK (((progress >= (0)::double precision) AND (progress <= (100)::double precision))),
  CONSTRAINT job_executions_progress_message_check CHECK ((length(progress_message) <= 500)),
  CONSTRAINT job_executions_result_check CHECK ((pg_column_size(result) <= 65536)),
  CONSTRAINT job_executions_retry_count_check CHECK ((retry_count >= 0)),
  CONSTRAINT job_executions_running_has_worker CHECK (((status <> 'running'::text) OR ((worker_id IS NOT NULL) AND (started_at IS NOT NULL)))),
  CONSTRAINT job_executions_scheduled_has_time CHECK (((trigger <> 'scheduled'::text) OR (scheduled_for IS NOT NULL))),
  CONSTRAINT job_executions_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'running'::text, 'succeeded'::text, 'failed'::text, 'timed_out'::text, 'cancelled'::text, 'skipped'::text]))),
  CONSTRAINT job_executions_trigger_check CHECK ((trigger = ANY (ARRAY['scheduled'::text, 'manual'::text, 'retry'::text]))),
  CONSTRAINT job_executions_worker_id_check CHECK ((length(worker_id) <= 200))
);
COMMENT ON TABLE edm.job_executions IS 'Execution history of jobs: one row per scheduled occurrence (run or skipped), manual run and retry. Pending rows are the queue runners claim from; finished rows are kept jobs.execution_retention_days.';
COMMENT ON COLUMN edm.job_executions.execution_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.job_executions.job_id IS 'The job.';
COMMENT ON COLUMN edm.job_executions.user_id IS 'User of the job when the execution was created (for per-user history and stats). Called tenant_id before 0021.';
COMMENT ON COLUMN edm.job_executions.trigger IS 'scheduled (a cron occurrence), manual (trigger now) or retry (of a failed execution).';
COMMENT ON COLUMN edm.job_executions.status IS 'pending, running, succeeded, failed, timed_out, cancelled or skipped (not run: misfire or max_concurrent; see error_code).';
COMMENT ON COLUMN edm.job_executions.priority IS 'The job''s priority when the execution was queued; the claim takes higher first.';
COMMENT ON COLUMN edm.job_executions.scheduled_for IS 'The cron occurrence this execution stands for (kept by retries); NULL for manual runs. Unique per job among scheduled executions.';
COMMENT ON COLUMN edm.job_executions.run_after IS 'Not claimed before this time: the occurrence, or now + back-off for a retry.';
COMMENT ON COLUMN edm.job_executions.created_at IS 'When the execution was queued (fired).';
COMMENT ON COLUMN edm.job_executions.started_at IS 'When a runner claimed it; started_at - scheduled_for is the firing delay.';
COMMENT ON COLUMN edm.job_executions.finished_at IS 'When it reached a final status.';
COMMENT ON COLUMN edm.job_executions.duration_ms IS 'Generated: finished_at - started_at in milliseconds.';
COMMENT ON COLUMN edm.job_executions.progress IS 'Progress reported by the running function, 0 to 100 (100 on success).';
COMMENT ON COLUMN edm.job_executions.progress_message IS 'Latest progress message.';
COMMENT ON COLUMN edm.job_executions.result IS 'JSON result: the function''s return value, the HTTP status and body head, the exit code and output tails, the created task id.';
COMMENT ON COLUMN edm.job_executions.error IS 'Error message of a failed, timed-out, cancelled or skipped execution.';
COMMENT ON COLUMN edm.job_executions.error_kind IS 'timeout, connection, http_status, unexpected_status, exception, exit_status, lost, config, permanent, cancelled or blocked (the outbound guard refused the destination of an http job); matched against the job''s retry_on. config, permanent, cancelled and blocked are never retried.';
COMMENT ON COLUMN edm.job_executions.error_type IS 'Python exception class name, when an exception was raised.';
COMMENT ON COLUMN edm.job_executions.error_code IS 'Stable code of a skip or failure (JOB_ALREADY_RUNNING, MISFIRE, ...).';
COMMENT ON COLUMN edm.job_executions.error_stack IS 'Stack trace of the exception, if any.';
COMMENT ON COLUMN edm.job_executions.retry_count IS 'Retries before this execution (0 for the first attempt).';
COMMENT ON COLUMN edm.job_executions.retry_of IS 'Execution this one retries. No foreign key: history is purged by age.';
COMMENT ON COLUMN edm.job_executions.worker_id IS 'Runner that claimed (or fired) it.';
COMMENT ON COLUMN edm.job_executions.lease_expires_at IS 'While running: started_at + timeout + jobs.lease_margin; afterwards the lease sweep records the run as lost (timed_out) and retries it per policy.';
COMMENT ON COLUMN edm.job_executions.cancel_requested_at IS 'When a cancel of the running execution was requested.';
CREATE INDEX job_executions_active_idx ON edm.job_executions USING btree (job_id) WHERE (status = ANY (ARRAY['pending'::text, 'running'::text]));
COMMENT ON INDEX edm.job_executions_active_idx IS 'A job''s pending and running executions (max_concurrent checks, stop, cancel).';
CREATE INDEX job_executions_claim_idx ON edm.job_executions USING btree (priority DESC, run_after, execution_id) WHERE (status = 'pending'::text);
COMMENT ON INDEX edm.job_executions_claim_idx IS 'The claim: pending executions, highest priority and earliest first.';
CREATE INDEX job_executions_finished_idx ON edm.job_executions USING btree (finished_at) WHERE (finished_at IS NOT NULL);
COMMENT ON INDEX edm.job_executions_finished_idx IS 'Retention purge and stats windows.';
CREATE INDEX job_executions_job_idx ON edm.job_executions USING btree (job_id, execution_id DESC);
COMMENT ON INDEX edm.job_executions_job_idx IS 'History of one job, newest first (also serves the cascade on job deletion).';
CREATE INDEX job_executions_lease_idx ON edm.job_executions USING btree (lease_expires_at) WHERE (status = 'running'::text);
COMMENT ON INDEX edm.job_executions_lease_idx IS 'The lease sweep: running executions by lease expiry.';
CREATE UNIQUE INDEX job_executions_retry_once_idx ON edm.job_executions USING btree (retry_of) WHERE (retry_of IS NOT NULL);
COMMENT ON INDEX edm.job_executions_retry_once_idx IS 'At most one retry per failed execution.';
CREATE UNIQUE INDEX job_executions_scheduled_once_idx ON edm.job_executions USING btree (job_id, scheduled_for) WHERE (trigger = 'scheduled'::text);
COMMENT ON INDEX edm.job_executions_scheduled_once_idx IS 'Exactly once: at most one scheduled execution per job and occurrence, whatever the number of runners.';
CREATE INDEX job_executions_user_running_idx ON edm.job_executions USING btree (user_id) WHERE (status = 'running'::text);
COMMENT ON INDEX edm.job_executions_user_running_idx IS 'Running executions of a user (jobs.max_running_per_user, checked by edm.job_claim).';

CREATE FUNCTION edm.lock_job(p_job_id bigint, p_user_id text)
 RETURNS edm.jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  j edm.jobs;
BEGIN
  BEGIN
    SELECT * INTO j FROM edm.jobs x
    WHERE x.job_id = p_job_id AND (p_user_id IS NULL OR x.user_id = p_user_id)
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;
  RETURN j;
END;
$function$;
COMMENT ON FUNCTION edm.lock_job(bigint,text) IS 'Locks (FOR NO KEY UPDATE) and returns job p_job_id, scoped to p_user_id when given (another user''s job is unknown, ED010); ED013 when it stays locked beyond the session''s lock_timeout. Internal to the job_* functions.';
REVOKE ALL ON FUNCTION edm.lock_job(bigint,text) FROM PUBLIC;

CREATE FUNCTION edm.job_cancel_execution(p_execution_id bigint, p_user_id text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_e   record;
BEGIN
  BEGIN
    SELECT e.execution_id, e.job_id, e.status, e.user_id INTO v_e
    FROM edm.job_executions e WHERE e.execution_id = p_execution_id
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'execution % is locked by another session', p_execution_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND OR (p_user_id IS NOT NULL AND v_e.user_id IS DISTINCT FROM p_user_id) THEN
    RAISE EXCEPTION 'execution % not found', p_execution_id USING ERRCODE = 'ED015';
  END IF;
  IF v_e.status NOT IN ('pending', 'running') THEN
    RAISE EXCEPTION 'execution % is already %', p_execution_id, v_e.status USING ERRCODE = 'ED003';
  END IF;
  UPDATE edm.job_executions e
  SET status = 'cancelled', finished_at = v_now, lease_expires_at = NULL,
      cancel_requested_at = v_now, error = 'cancelled', error_kind = 'cancelled',
      error_code = 'CANCELLED'
  WHERE e.execution_id = p_execution_id;
  IF v_e.status = 'running' THEN
    UPDATE edm.jobs j SET running_count = greatest(j.running_count - 1, 0),
                          last_finished_at = v_now, last_status = 'cancelled'
    WHERE j.job_id = v_e.job_id;
    PERFORM pg_notify('edm_jobs_cancel', p_execution_id::text);
    PERFORM pg_notify('edm_jobs', 'slot:' || v_e.job_id);
  END IF;
  RETURN v_e.status;
END;
$function$;
COMMENT ON FUNCTION edm.job_cancel_execution(bigint,text,timestamp with time zone) IS 'Cancels a pending or running execution (of user p_user_id when given) at once: it is recorded as cancelled, its slot is freed, and the runner holding it is told (NOTIFY edm_jobs_cancel) to kill the process or signal the function. Returns the status it had. ED015 unknown execution, ED003 already finished.';
REVOKE ALL ON FUNCTION edm.job_cancel_execution(bigint,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_claim(p_worker text, p_limit integer DEFAULT 1, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(execution_id bigint, job_id bigint, user_id text, job_name text, kind text, target jsonb, trigger text, scheduled_for timestamp with time zone, retry_count integer, timeout_seconds integer, started_at timestamp with time zone, lease_expires_at timestamp with time zone)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_now     timestamptz := coalesce(p_now, now());
  v_margin  interval := make_interval(secs => edm.config_int('jobs.lease_margin'));
  v_per_user integer := edm.config_int('jobs.max_running_per_user');
  v_c       record;
  v_n       integer := 0;
  v_running bigint;
  v_full    bigint[] := '{}';
  v_full_users text[] := '{}';
BEGIN
  IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'job_claim: worker id must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'job_claim: limit must be between 1 and 1000, got %', p_limit USING ERRCODE = 'ED005';
  END IF;

  -- Pending executions that are due, best first, whose job has a free slot as
  -- far as this snapshot knows. SKIP LOCKED: a row another runner is claiming
  -- is theirs. The LIMIT bounds the rows locked by one call.
  FOR v_c IN
    SELECT e.execution_id, e.job_id, e.trigger, e.user_id
    FROM edm.job_executions e
    JOIN edm.jobs j ON j.job_id = e.job_id
    WHERE e.status = 'pending' AND e.run_after <= v_now
      AND j.running_count < j.max_concurrent
      AND (j.status <> 'paused' OR e.trigger = 'manual')
    ORDER BY e.priority DESC, e.run_after, e.execution_id
    LIMIT p_limit * 4 + 16
    FOR UPDATE OF e SKIP LOCKED
  LOOP
    CONTINUE WHEN v_c.job_id = ANY (v_full);
    -- The user's share of running executions (jobs.max_running_per_user).
    -- A transaction-scoped advisory lock per user serialises the check with
    -- other claimers; taken with try, so a claim never waits: a user another
    -- runner is claiming for right now is left for the next call. Holding the
    -- lock, the count (a new snapshot per statement) sees every committed claim.
    IF v_per_user > 0 AND v_c.user_id IS NOT NULL THEN
      CONTINUE WHEN v_c.user_id = ANY (v_full_users);
      IF NOT pg_try_advisory_xact_lock(hashtextextended('edm.jobs.running:' || v_c.user_id, 0)) THEN
        v_full_users := v_full_users || v_c.user_id;
        CONTINUE;
      END IF;
      SELECT count(*) INTO v_running FROM edm.job_executions e
      WHERE e.user_id = v_c.user_id AND e.status = 'running';
      IF v_running >= v_per_user THEN
        v_full_users := v_full_users || v_c.user_id;
        CONTINUE;
      END IF;
    END IF;
    -- Take one of the job's max_concurrent slots. The job row is locked with
    -- SKIP LOCKED so the claim never waits (a job being fired or edited right
    -- now is tried again on the next call); holding the lock, the slot check
    -- reads the latest running_count, so two claimers never share a slot.
    PERFORM 1 FROM edm.jobs j WHERE j.job_id = v_c.job_id FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
      v_full := v_full || v_c.job_id;
      CONTINUE;
    END IF;
    UPDATE edm.jobs j SET running_count = j.running_count + 1
    WHERE j.job_id = v_c.job_id AND j.running_count < j.max_concurrent
      AND (j.status <> 'paused' OR v_c.trigger = 'manual');
    IF NOT FOUND THEN
      v_full := v_full || v_c.job_id;
      CONTINUE;
    END IF;

    RETURN QUERY
    UPDATE edm.job_executions e
    SET status = 'running', worker_id = p_worker, started_at = v_now,
        lease_expires_at = v_now + make_interval(secs => j.timeout_seconds) + v_margin
    FROM edm.jobs j
    WHERE e.execution_id = v_c.execution_id AND j.job_id = e.job_id
    RETURNING e.execution_id, e.job_id, e.user_id, j.name, j.kind, j.target, e.trigger,
              e.scheduled_for, e.retry_count, j.timeout_seconds, e.started_at, e.lease_expires_at;
    v_n := v_n + 1;
    EXIT WHEN v_n >= p_limit;
  END LOOP;
END;
$function$;
COMMENT ON FUNCTION edm.job_claim(text,integer,timestamp with time zone) IS 'Claims up to p_limit due pending executions for runner p_worker, highest priority and earliest first, taking one of their job''s max_concurrent slots each and, when jobs.max_running_per_user > 0, staying within the user''s share of running executions; marks them running with a lease of timeout + jobs.lease_margin. Skips executions of paused jobs (except manual runs). Never waits on a lock.';
REVOKE ALL ON FUNCTION edm.job_claim(text,integer,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_complete(p_execution_id bigint, p_worker text, p_status text, p_result jsonb DEFAULT NULL::jsonb, p_error text DEFAULT NULL::text, p_error_kind text DEFAULT NULL::text, p_error_type text DEFAULT NULL::text, p_error_stack text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(accepted boolean, retry_execution_id bigint, retry_at timestamp with time zone)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_now  timestamptz := coalesce(p_now, now());
  v_e    record;
  v_job  record;
  v_retry record;
BEGIN
  IF p_status IS NULL OR p_status NOT IN ('succeeded', 'failed', 'timed_out') THEN
    RAISE EXCEPTION 'job_complete: status must be succeeded, failed or timed_out' USING ERRCODE = 'ED005';
  END IF;
  -- Lock order: the execution, then its job.
  SELECT e.execution_id, e.job_id, e.status, e.worker_id INTO v_e
  FROM edm.job_executions e WHERE e.execution_id = p_execution_id
  FOR NO KEY UPDATE;
  IF NOT FOUND OR v_e.status <> 'running' OR v_e.worker_id IS DISTINCT FROM p_worker THEN
    -- Cancelled, recovered by the lease sweep, or deleted meanwhile: the
    -- outcome is not recorded and nothing is retried.
    RETURN QUERY SELECT false, NULL::bigint, NULL::timestamptz;
    RETURN;
  END IF;

  UPDATE edm.job_executions e
  SET status = p_status, finished_at = v_now, lease_expires_at = NULL,
      result = p_result,
      error = left(p_error, 4000), error_kind = left(p_error_kind, 100),
      error_type = left(p_error_type, 200), error_stack = left(p_error_stack, 20000),
      progress = CASE WHEN p_status = 'succeeded' THEN 100 ELSE e.progress END
  WHERE e.execution_id = p_execution_id;

  UPDATE edm.jobs j
  SET running_count = greatest(j.running_count - 1, 0),
      last_finished_at = v_now, last_status = p_status,
      success_count = j.success_count + (p_status = 'succeeded')::integer,
      failure_count = j.failure_count + (p_status <> 'succeeded')::integer
  WHERE j.job_id = v_e.job_id
  RETURNING j.job_id, j.running_count, j.max_concurrent INTO v_job;

  SELECT r.execution_id, r.run_after INTO v_retry FROM edm.job_schedule_retry(p_execution_id, v_now) r;

  -- A slot was freed on a job whose executions may be waiting for one.
  IF v_job.running_count + 1 >= v_job.max_concurrent
     AND EXISTS (SELECT 1 FROM edm.job_executions e
                 WHERE e.job_id = v_e.job_id AND e.status = 'pending') THEN
    PERFORM pg_notify('edm_jobs', 'slot:' || v_e.job_id);
  END IF;
  RETURN QUERY SELECT true, v_retry.execution_id, v_retry.run_after;
END;
$function$;
COMMENT ON FUNCTION edm.job_complete(bigint,text,text,jsonb,text,text,text,text,timestamp with time zone) IS 'Records the outcome of a running execution held by p_worker (succeeded, failed or timed_out), frees its max_concurrent slot, updates the job''s counters and queues a retry per the job''s policy. Returns accepted = false (and changes nothing) when the execution is no longer this worker''s running one (cancelled, lost, deleted).';
REVOKE ALL ON FUNCTION edm.job_complete(bigint,text,text,jsonb,text,text,text,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_complete(p_worker text, p_execution_ids bigint[], p_statuses text[], p_results jsonb DEFAULT NULL::jsonb, p_errors text[] DEFAULT NULL::text[], p_error_kinds text[] DEFAULT NULL::text[], p_error_types text[] DEFAULT NULL::text[], p_error_stacks text[] DEFAULT NULL::text[], p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(execution_id bigint, accepted boolean, retry_execution_id bigint, retry_at timestamp with time zone)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_n integer := coalesce(cardinality(p_execution_ids), 0);
  v_i integer;
BEGIN
  IF v_n = 0 THEN
    RETURN;
  END IF;
  IF v_n > 1000
     OR cardinality(p_statuses) IS DISTINCT FROM v_n
     OR (p_results IS NOT NULL AND (jsonb_typeof(p_results) <> 'array'
                                    OR jsonb_array_length(p_results) <> v_n))
     OR (p_errors IS NOT NULL AND cardinality(p_errors) <> v_n)
     OR (p_error_kinds IS NOT NULL AND cardinality(p_error_kinds) <> v_n)
     OR (p_error_types IS NOT NULL AND cardinality(p_error_types) <> v_n)
     OR (p_error_stacks IS NOT NULL AND cardinality(p_error_stacks) <> v_n)
     OR (SELECT count(DISTINCT i) FROM unnest(p_execution_ids) i) <> v_n THEN
    RAISE EXCEPTION 'job_complete: at most 1000 distinct executions, and one entry per execution in every array'
      USING ERRCODE = 'ED005';
  END IF;
  -- Lock order: every execution (id order), then every job (id order), before
  -- changing anything. Holding all the executions first means no job row is
  -- held while waiting for an execution, so this cannot deadlock with the
  -- lease sweep, a cancel or a stop, which lock executions before jobs.
  PERFORM 1 FROM edm.job_executions e WHERE e.execution_id = ANY (p_execution_ids)
  ORDER BY e.execution_id FOR NO KEY UPDATE;
  PERFORM 1 FROM edm.jobs j
  WHERE j.job_id IN (SELECT e.job_id FROM edm.job_executions e
                     WHERE e.execution_id = ANY (p_execution_ids))
  ORDER BY j.job_id FOR NO KEY UPDATE;
  FOR v_i IN 1..v_n LOOP
    RETURN QUERY
    SELECT p_execution_ids[v_i], f.accepted, f.retry_execution_id, f.retry_at
    FROM edm.job_complete(p_execution_ids[v_i], p_worker, p_statuses[v_i],
                        CASE WHEN p_results IS NULL OR p_results -> (v_i - 1) = 'null'::jsonb
                             THEN NULL ELSE p_results -> (v_i - 1) END,
                        p_errors[v_i], p_error_kinds[v_i], p_error_types[v_i], p_error_stacks[v_i],
                        p_now) f;
  END LOOP;
END;
$function$;
COMMENT ON FUNCTION edm.job_complete(text,bigint[],text[],jsonb,text[],text[],text[],text[],timestamp with time zone) IS 'edm.job_complete for a batch of executions held by one runner, in one transaction (one commit): element i of each array (and of the JSON array p_results) belongs to p_execution_ids[i]. Locks all executions, then all jobs, each in id order, so it cannot deadlock with the lease sweep or host operations.';
REVOKE ALL ON FUNCTION edm.job_complete(text,bigint[],text[],jsonb,text[],text[],text[],text[],timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_create(p_job jsonb, p_next_run_at timestamp with time zone, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_id  bigint;
BEGIN
  IF p_job IS NULL OR jsonb_typeof(p_job) <> 'object' THEN
    RAISE EXCEPTION 'job_create: the job must be a JSON object' USING ERRCODE = 'ED012';
  END IF;
  IF p_job ? 'tenant_id' AND p_job ? 'user_id'
     AND p_job -> 'tenant_id' IS DISTINCT FROM p_job -> 'user_id' THEN
    RAISE EXCEPTION 'job_create: user_id and tenant_id (its older name) name different users'
      USING ERRCODE = 'ED012';
  END IF;
  -- Every setting comes from p_job (keys named like the columns); the
  -- column defaults apply to the keys left out.
  INSERT INTO edm.jobs (user_id, name, description, kind, target, cron_expr, timezone, start_at,
                        end_at, max_executions, status, priority, max_concurrent, timeout_seconds,
                        max_retries, retry_delay_seconds, retry_backoff, retry_max_delay_seconds,
                        retry_on, misfire_policy, misfire_grace_seconds, tags, next_run_at,
                        created_at, updated_at)
  SELECT coalesce(r.user_id, p_job ->> 'tenant_id'), r.name, r.description, r.kind, r.target, r.cron_expr,
         coalesce(r.timezone, 'UTC'), r.start_at, r.end_at, r.max_executions,
         coalesce(r.status, 'active'), coalesce(r.priority, 0), coalesce(r.max_concurrent, 1),
         coalesce(r.timeout_seconds, 300), coalesce(r.max_retries, 0),
         coalesce(r.retry_delay_seconds, 60), coalesce(r.retry_backoff, 2),
         coalesce(r.retry_max_delay_seconds, 3600),
         coalesce(r.retry_on, '{timeout,connection,http_status,exception,exit_status,lost}'),
         coalesce(r.misfire_policy, 'run_once'), coalesce(r.misfire_grace_seconds, 60),
         coalesce(r.tags, '{}'), p_next_run_at, v_now, v_now
  FROM jsonb_populate_record(NULL::edm.jobs, p_job) r
  RETURNING job_id INTO v_id;
  RETURN v_id;
END;
$function$;
COMMENT ON FUNCTION edm.job_create(jsonb,timestamp with time zone,timestamp with time zone) IS 'Creates a job from p_job (a JSON object whose keys are column names of edm.jobs; the older key tenant_id is read as user_id) with its first run p_next_run_at, computed by the caller with cronsim (NULL for a paused job). The CHECK constraints and the jobs_check_write trigger validate it (ED012 shell disabled, ED014 user quota). Returns the job id.';
REVOKE ALL ON FUNCTION edm.job_create(jsonb,timestamp with time zone,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_delete(p_job_id bigint, p_user_id text DEFAULT NULL::text, p_force boolean DEFAULT false)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_running integer;
  v_ids bigint[];
BEGIN
  BEGIN
    -- Lock order: executions, then the job (the cascade then finds them locked).
    SELECT coalesce(array_agg(x.execution_id), '{}') INTO v_ids FROM (
      SELECT e.execution_id FROM edm.job_executions e
      WHERE e.job_id = p_job_id AND e.status = 'running'
      ORDER BY e.execution_id FOR NO KEY UPDATE) x;
    PERFORM 1 FROM edm.jobs j
    WHERE j.job_id = p_job_id AND (p_user_id IS NULL OR j.user_id = p_user_id)
    FOR UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;
  v_running := cardinality(v_ids);
  IF v_running > 0 AND NOT p_force THEN
    RAISE EXCEPTION 'job % has % running execution(s): stop or cancel them, or delete with force',
      p_job_id, v_running USING ERRCODE = 'ED011';
  END IF;
  DELETE FROM edm.jobs j WHERE j.job_id = p_job_id;
  PERFORM pg_notify('edm_jobs_cancel', x::text) FROM unnest(v_ids) x;
  RETURN true;
END;
$function$;
COMMENT ON FUNCTION edm.job_delete(bigint,text,boolean) IS 'Deletes a job and its history. ED011 when executions are running, unless p_force (their runners are then told to stop); ED010 unknown job.';
REVOKE ALL ON FUNCTION edm.job_delete(bigint,text,boolean) FROM PUBLIC;

CREATE FUNCTION edm.job_due(p_limit integer DEFAULT 32, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(job_id bigint, cron_expr text, timezone text, next_run_at timestamp with time zone, end_at timestamp with time zone, max_executions bigint, run_count bigint, misfire_policy text, misfire_grace_seconds integer, fire_now timestamp with time zone)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'job_due: limit must be between 1 and 1000, got %', p_limit
      USING ERRCODE = 'ED005';
  END IF;
  -- The row locks last until the caller's transaction ends: the caller plans
  -- each job with cronsim and calls edm.job_fire in the same transaction.
  -- SKIP LOCKED: a job another runner is firing (or a host is editing) is
  -- left to them.
  RETURN QUERY
  SELECT j.job_id, j.cron_expr, j.timezone, j.next_run_at, j.end_at, j.max_executions,
         j.run_count, j.misfire_policy, j.misfire_grace_seconds, coalesce(p_now, now())
  FROM edm.jobs j
  WHERE j.status = 'active' AND j.next_run_at <= coalesce(p_now, now())
  ORDER BY j.next_run_at
  LIMIT p_limit
  FOR NO KEY UPDATE OF j SKIP LOCKED;
END;
$function$;
COMMENT ON FUNCTION edm.job_due(integer,timestamp with time zone) IS 'Locks (until the end of the caller''s transaction, SKIP LOCKED) and returns up to p_limit active jobs whose next run has come, earliest first, with what the caller needs to plan the firing with cronsim, and the time it must plan for (fire_now).';
REVOKE ALL ON FUNCTION edm.job_due(integer,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_expire_runs(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone, p_limit integer DEFAULT 1000)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_ids bigint[];
  v_id  bigint;
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100000 THEN
    RAISE EXCEPTION 'job_expire_runs: limit must be between 1 and 100000' USING ERRCODE = 'ED005';
  END IF;
  -- Executions first (one being finished right now is skipped: its finish
  -- wins), then their jobs in id order.
  SELECT array_agg(x.execution_id) INTO v_ids FROM (
    SELECT e.execution_id FROM edm.job_executions e
    WHERE e.status = 'running' AND e.lease_expires_at <= v_now
    ORDER BY e.execution_id
    LIMIT p_limit
    FOR NO KEY UPDATE SKIP LOCKED) x;
  IF v_ids IS NULL THEN
    RETURN 0;
  END IF;
  PERFORM 1 FROM edm.jobs j
  WHERE j.job_id IN (SELECT e.job_id FROM edm.job_executions e WHERE e.execution_id = ANY (v_ids))
  ORDER BY j.job_id FOR NO KEY UPDATE;

  UPDATE edm.jobs j
  SET running_count = greatest(j.running_count - a.n, 0),
      failure_count = j.failure_count + a.n,
      last_finished_at = v_now, last_status = 'timed_out'
  FROM (SELECT e.job_id, count(*)::integer AS n FROM edm.job_executions e
        WHERE e.execution_id = ANY (v_ids) GROUP BY e.job_id) a
  WHERE j.job_id = a.job_id;

  UPDATE edm.job_executions e
  SET status = 'timed_out', finished_at = v_now,
      error = format('lease expired at %s: worker %s stopped reporting (crashed or hung)',
                     e.lease_expires_at, e.worker_id),
      error_kind = 'lost', error_code = 'LEASE_EXPIRED', lease_expires_at = NULL
  WHERE e.execution_id = ANY (v_ids);

  FOREACH v_id IN ARRAY v_ids LOOP
    PERFORM edm.job_schedule_retry(v_id, v_now);
  END LOOP;
  RETURN cardinality(v_ids);
END;
$function$;
COMMENT ON FUNCTION edm.job_expire_runs(timestamp with time zone,integer) IS 'The lease sweep of jobs: running executions whose lease expired (their runner crashed or hung past timeout + jobs.lease_margin) become timed_out with error kind lost, free their slot and are retried per policy. Returns how many it handled.';
REVOKE ALL ON FUNCTION edm.job_expire_runs(timestamp with time zone,integer) FROM PUBLIC;

CREATE FUNCTION edm.job_finish(p_execution_id bigint, p_worker text, p_status text, p_result jsonb DEFAULT NULL::jsonb, p_error text DEFAULT NULL::text, p_error_kind text DEFAULT NULL::text, p_error_type text DEFAULT NULL::text, p_error_stack text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(accepted boolean, retry_execution_id bigint, retry_at timestamp with time zone)
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$SELECT * FROM edm.job_complete($1, $2, $3, $4, $5, $6, $7, $8, $9)$function$;
COMMENT ON FUNCTION edm.job_finish(bigint,text,text,jsonb,text,text,text,text,timestamp with time zone) IS 'Deprecated: the older name of edm.job_complete (same arguments, same result), kept for a release.';
REVOKE ALL ON FUNCTION edm.job_finish(bigint,text,text,jsonb,text,text,text,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_finish(p_worker text, p_execution_ids bigint[], p_statuses text[], p_results jsonb DEFAULT NULL::jsonb, p_errors text[] DEFAULT NULL::text[], p_error_kinds text[] DEFAULT NULL::text[], p_error_types text[] DEFAULT NULL::text[], p_error_stacks text[] DEFAULT NULL::text[], p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(execution_id bigint, accepted boolean, retry_execution_id bigint, retry_at timestamp with time zone)
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$SELECT * FROM edm.job_complete($1, $2, $3, $4, $5, $6, $7, $8, $9)$function$;
COMMENT ON FUNCTION edm.job_finish(text,bigint[],text[],jsonb,text[],text[],text[],text[],timestamp with time zone) IS 'Deprecated: the older name of edm.job_complete (same arguments, same result), kept for a release.';
REVOKE ALL ON FUNCTION edm.job_finish(text,bigint[],text[],jsonb,text[],text[],text[],text[],timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_fire(p_job_id bigint, p_due timestamp with time zone, p_run_times timestamp with time zone[], p_next timestamp with time zone, p_end_reason text DEFAULT NULL::text, p_queue_all boolean DEFAULT false, p_missed integer DEFAULT 0, p_missed_first timestamp with time zone DEFAULT NULL::timestamp with time zone, p_missed_last timestamp with time zone DEFAULT NULL::timestamp with time zone, p_worker text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(execution_id bigint, scheduled_for timestamp with time zone, status text)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_now     timestamptz := coalesce(p_now, now());
  v_runs    timestamptz[] := coalesce(p_run_times, '{}');
  v_last    timestamptz;
  v_job     record;
  v_active  integer;
  v_pending integer := 0;
  v_t       timestamptz;
BEGIN
  IF p_job_id IS NULL OR p_due IS NULL THEN
    RAISE EXCEPTION 'job_fire: job id and due time are required' USING ERRCODE = 'ED005';
  END IF;
  IF cardinality(v_runs) > 10000
     OR array_position(v_runs, NULL) IS NOT NULL
     OR EXISTS (SELECT 1 FROM unnest(v_runs) WITH ORDINALITY a(t, i)
                JOIN unnest(v_runs) WITH ORDINALITY b(t, i) ON b.i = a.i + 1
                WHERE b.t <= a.t)
     OR (cardinality(v_runs) > 0 AND (v_runs[1] < p_due OR v_runs[cardinality(v_runs)] > v_now)) THEN
    RAISE EXCEPTION 'job_fire: run times must be at most 10000 increasing occurrences between the due time and now'
      USING ERRCODE = 'ED005';
  END IF;
  v_last := v_runs[cardinality(v_runs)];
  IF p_next IS NOT NULL AND p_next <= greatest(v_last, p_due) THEN
    RAISE EXCEPTION 'job_fire: the next run (%) must come after the runs fired', p_next
      USING ERRCODE = 'ED005';
  END IF;
  IF p_next IS NULL AND p_end_reason IS NULL THEN
    RAISE EXCEPTION 'job_fire: a job without a next run needs an end reason' USING ERRCODE = 'ED005';
  END IF;
  IF coalesce(p_missed, 0) < 0 OR (p_missed > 0 AND p_missed_first IS NULL) THEN
    RAISE EXCEPTION 'job_fire: missed runs need a count >= 0 and a first missed time'
      USING ERRCODE = 'ED005';
  END IF;

  -- The compare-and-set that makes firing exactly-once: only the transaction
  -- that still sees next_run_at = the due time it read moves it on. Another
  -- runner that read the same due time waits for our row lock, re-checks the
  -- WHERE on the new row version, matches nothing and returns no rows.
  UPDATE edm.jobs j
  SET next_run_at = p_next,
      status = CASE WHEN p_next IS NULL THEN 'inactive' ELSE j.status END,
      inactive_reason = CASE WHEN p_next IS NULL THEN left(p_end_reason, 500) END,
      run_count = j.run_count + cardinality(v_runs),
      misfire_count = j.misfire_count + coalesce(p_missed, 0),
      last_scheduled_for = coalesce(v_last, j.last_scheduled_for),
      last_fired_at = v_now
  WHERE j.job_id = p_job_id AND j.status = 'active' AND j.next_run_at = p_due
  RETURNING j.job_id, j.user_id, j.priority, j.max_concurrent, j.max_executions, j.run_count,
            j.misfire_policy, j.misfire_grace_seconds
  INTO v_job;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF v_job.max_executions IS NOT NULL AND v_job.run_count > v_job.max_executions THEN
    RAISE EXCEPTION 'job_fire: job % would exceed max_executions (%)', p_job_id, v_job.max_executions
      USING ERRCODE = 'ED005';
  END IF;

  IF p_missed > 0 THEN
    RETURN QUERY
    INSERT INTO edm.job_executions AS e (job_id, user_id, trigger, status, priority, scheduled_for,
                                         run_after, created_at, finished_at, error, error_code, worker_id)
    VALUES (p_job_id, v_job.user_id, 'scheduled', 'skipped', v_job.priority, p_missed_first, v_now,
            v_now, v_now,
            format('%s occurrence(s) from %s to %s missed by more than %s s (misfire policy %s)',
                   p_missed, p_missed_first, coalesce(p_missed_last, p_missed_first),
                   v_job.misfire_grace_seconds, v_job.misfire_policy),
            'MISFIRE', p_worker)
    RETURNING e.execution_id, e.scheduled_for, e.status;
  END IF;

  SELECT count(*) INTO v_active FROM edm.job_executions e
  WHERE e.job_id = p_job_id AND e.status IN ('pending', 'running');

  FOREACH v_t IN ARRAY v_runs LOOP
    IF p_queue_all OR v_active < v_job.max_concurrent THEN
      RETURN QUERY
      INSERT INTO edm.job_executions AS e (job_id, user_id, trigger, status, priority, scheduled_for,
                                           run_after, created_at, worker_id)
      VALUES (p_job_id, v_job.user_id, 'scheduled', 'pending', v_job.priority, v_t, v_t, v_now, p_worker)
      RETURNING e.execution_id, e.scheduled_for, e.status;
      v_active := v_active + 1;
      v_pending := v_pending + 1;
    ELSE
      RETURN QUERY
      INSERT INTO edm.job_executions AS e (job_id, user_id, trigger, status, priority, scheduled_for,
                                           run_after, created_at, finished_at, error, error_code,
                                           worker_id)
      VALUES (p_job_id, v_job.user_id, 'scheduled', 'skipped', v_job.priority, v_t, v_t, v_now, v_now,
              format('not run: %s execution(s) already pending or running (max_concurrent %s)',
                     v_active, v_job.max_concurrent),
              'JOB_ALREADY_RUNNING', p_worker)
      RETURNING e.execution_id, e.scheduled_for, e.status;
    END IF;
  END LOOP;
  -- The firing runner claims right away; tell the others only when there is
  -- more than one run to share.
  IF v_pending > 1 THEN
    PERFORM pg_notify('edm_jobs', 'pending:' || p_job_id);
  END IF;
END;
$function$;
COMMENT ON FUNCTION edm.job_fire(bigint,timestamp with time zone,timestamp with time zone[],timestamp with time zone,text,boolean,integer,timestamp with time zone,timestamp with time zone,text,timestamp with time zone) IS 'Fires a due job exactly once: if next_run_at still equals p_due (compare-and-set), moves it to p_next (computed by the caller with cronsim; NULL ends the job with p_end_reason) and queues one pending execution per occurrence in p_run_times, or records it as skipped (JOB_ALREADY_RUNNING) when max_concurrent executions are already pending or running, unless p_queue_all (run_all catch-up). p_missed occurrences not run are recorded as one skipped MISFIRE row. Returns the rows created; none when another runner fired first.';
REVOKE ALL ON FUNCTION edm.job_fire(bigint,timestamp with time zone,timestamp with time zone[],timestamp with time zone,text,boolean,integer,timestamp with time zone,timestamp with time zone,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_next_wakeup(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
RETURN LEAST((SELECT min(j.next_run_at) AS min FROM edm.jobs j WHERE (j.status = 'active'::text)), (SELECT min(e.run_after) AS min FROM (edm.job_executions e JOIN edm.jobs j ON ((j.job_id = e.job_id))) WHERE ((e.status = 'pending'::text) AND (j.running_count < j.max_concurrent) AND ((j.status <> 'paused'::text) OR (e.trigger = 'manual'::text)) AND ((e.user_id IS NULL) OR (COALESCE(edm.config_int('jobs.max_running_per_user'::text), 0) = 0) OR ((SELECT count(*) AS count FROM edm.job_executions r WHERE ((r.user_id = e.user_id) AND (r.status = 'running'::text))) < edm.config_int('jobs.max_running_per_user'::text))))), (SELECT min(e.lease_expires_at) AS min FROM edm.job_executions e WHERE (e.status = 'running'::text)));
COMMENT ON FUNCTION edm.job_next_wakeup(timestamp with time zone) IS 'The earliest time a runner could have work: a job''s next run, a claimable pending execution (manual run, retry, catch-up; not one of a user at jobs.max_running_per_user), or a lease expiring. NULL when nothing is scheduled. Runners sleep until then or a NOTIFY edm_jobs.';
REVOKE ALL ON FUNCTION edm.job_next_wakeup(timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_pause(p_job_id bigint, p_user_id text DEFAULT NULL::text)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_status text;
BEGIN
  v_status := (edm.lock_job(p_job_id, p_user_id)).status;
  IF v_status = 'inactive' THEN
    RAISE EXCEPTION 'job % is inactive: resume it instead', p_job_id USING ERRCODE = 'ED003';
  END IF;
  UPDATE edm.jobs j SET status = 'paused', next_run_at = NULL, updated_at = now()
  WHERE j.job_id = p_job_id AND j.status = 'active';
  RETURN v_status;
END;
$function$;
COMMENT ON FUNCTION edm.job_pause(bigint,text) IS 'Pauses an active job: no scheduled runs, queued retries held, running executions continue. Idempotent on a paused job; ED003 on an inactive one. Returns the previous status. Resuming needs a new next_run_at, computed by the Python API (JobScheduler.resume_job).';
REVOKE ALL ON FUNCTION edm.job_pause(bigint,text) FROM PUBLIC;

CREATE FUNCTION edm.job_progress(p_execution_id bigint, p_worker text, p_progress real, p_message text DEFAULT NULL::text)
 RETURNS boolean
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  WITH upd AS (
    UPDATE edm.job_executions e
    SET progress = greatest(0, least(100, p_progress)),
        progress_message = coalesce(left(p_message, 500), e.progress_message)
    WHERE e.execution_id = p_execution_id AND e.status = 'running' AND e.worker_id = p_worker
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM upd);
$function$;
COMMENT ON FUNCTION edm.job_progress(bigint,text,real,text) IS 'Records the progress (0-100) and message of a running execution held by p_worker. Returns false when it is no longer running for that worker (cancelled or lost): the function should stop.';
REVOKE ALL ON FUNCTION edm.job_progress(bigint,text,real,text) FROM PUBLIC;

CREATE FUNCTION edm.job_purge_executions(p_now timestamp with time zone DEFAULT NULL::timestamp with time zone, p_limit integer DEFAULT 10000)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_before timestamptz := coalesce(p_now, now())
                          - make_interval(days => edm.config_int('jobs.execution_retention_days'));
  v_n integer;
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000000 THEN
    RAISE EXCEPTION 'job_purge_executions: limit must be between 1 and 1000000' USING ERRCODE = 'ED005';
  END IF;
  -- One purger at a time; the others have nothing to add.
  IF NOT pg_try_advisory_xact_lock(hashtextextended('edm.job_purge_executions', 0)) THEN
    RETURN 0;
  END IF;
  DELETE FROM edm.job_executions e
  WHERE e.execution_id IN (
    SELECT x.execution_id FROM edm.job_executions x
    WHERE x.finished_at < v_before
    ORDER BY x.finished_at
    LIMIT p_limit);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.job_purge_executions(timestamp with time zone,integer) IS 'Deletes up to p_limit finished executions older than jobs.execution_retention_days (oldest first). One caller at a time (advisory lock); returns how many it deleted.';
REVOKE ALL ON FUNCTION edm.job_purge_executions(timestamp with time zone,integer) FROM PUBLIC;

CREATE FUNCTION edm.job_resume(p_job_id bigint, p_next_run_at timestamp with time zone, p_expected_updated_at timestamp with time zone, p_user_id text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_job record;
BEGIN
  v_job := edm.lock_job(p_job_id, p_user_id);
  IF v_job.status = 'active' THEN
    RETURN true;
  END IF;
  IF v_job.updated_at IS DISTINCT FROM p_expected_updated_at THEN
    RETURN false;
  END IF;
  IF v_job.max_executions IS NOT NULL AND v_job.run_count >= v_job.max_executions THEN
    RAISE EXCEPTION 'job % reached max_executions (%); raise it before resuming',
      p_job_id, v_job.max_executions USING ERRCODE = 'ED003';
  END IF;
  IF p_next_run_at IS NULL THEN
    RAISE EXCEPTION 'job % has no occurrence left before its end_at; change end_at first', p_job_id
      USING ERRCODE = 'ED003';
  END IF;
  UPDATE edm.jobs j
  SET status = 'active', inactive_reason = NULL, next_run_at = p_next_run_at,
      updated_at = greatest(v_now, j.updated_at + interval '1 microsecond')
  WHERE j.job_id = p_job_id;
  RETURN true;
END;
$function$;
COMMENT ON FUNCTION edm.job_resume(bigint,timestamp with time zone,timestamp with time zone,text,timestamp with time zone) IS 'Activates a paused or inactive job with next run p_next_run_at (the first occurrence after now, computed by the caller with cronsim; occurrences during the pause are not caught up). No-op on an active job. Returns false when the job changed since the caller read it (p_expected_updated_at). ED003 when max_executions is reached or no occurrence is left.';
REVOKE ALL ON FUNCTION edm.job_resume(bigint,timestamp with time zone,timestamp with time zone,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_retry_delay(p_delay double precision, p_backoff double precision, p_max_delay double precision, p_retry_count integer)
 RETURNS double precision
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
RETURN LEAST(p_max_delay, (p_delay * power(p_backoff, (LEAST(p_retry_count, 1000))::double precision)));
COMMENT ON FUNCTION edm.job_retry_delay(double precision,double precision,double precision,integer) IS 'Seconds before retry number p_retry_count + 1: p_delay * p_backoff ^ p_retry_count, capped at p_max_delay.';
REVOKE ALL ON FUNCTION edm.job_retry_delay(double precision,double precision,double precision,integer) FROM PUBLIC;

CREATE FUNCTION edm.job_schedule_retry(p_execution_id bigint, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(execution_id bigint, run_after timestamp with time zone)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_e   record;
  v_at  timestamptz;
BEGIN
  SELECT e.execution_id, e.job_id, e.user_id, e.status, e.retry_count, e.scheduled_for,
         e.error_kind, e.error_type, j.status AS job_status, j.priority, j.max_retries,
         j.retry_delay_seconds, j.retry_backoff, j.retry_max_delay_seconds, j.retry_on
  INTO v_e
  FROM edm.job_executions e JOIN edm.jobs j ON j.job_id = e.job_id
  WHERE e.execution_id = p_execution_id;
  IF NOT FOUND
     OR v_e.status NOT IN ('failed', 'timed_out')
     OR v_e.job_status = 'inactive'
     OR v_e.retry_count >= v_e.max_retries
     OR coalesce(v_e.error_kind, 'exception') IN ('config', 'permanent', 'cancelled')
     OR NOT (coalesce(v_e.error_kind, 'exception') = ANY (v_e.retry_on)
             OR coalesce(v_e.error_type = ANY (v_e.retry_on), false)) THEN
    RETURN;
  END IF;
  v_at := v_now + make_interval(secs => edm.job_retry_delay(
            v_e.retry_delay_seconds, v_e.retry_backoff, v_e.retry_max_delay_seconds, v_e.retry_count));
  RETURN QUERY
  INSERT INTO edm.job_executions AS e (job_id, user_id, trigger, status, priority, scheduled_for,
                                       run_after, created_at, retry_count, retry_of)
  VALUES (v_e.job_id, v_e.user_id, 'retry', 'pending', v_e.priority, v_e.scheduled_for, v_at, v_now,
          v_e.retry_count + 1, v_e.execution_id)
  ON CONFLICT (retry_of) WHERE retry_of IS NOT NULL DO NOTHING
  RETURNING e.execution_id, e.run_after;
  PERFORM pg_notify('edm_jobs', 'retry:' || v_e.job_id);
END;
$function$;
COMMENT ON FUNCTION edm.job_schedule_retry(bigint,timestamp with time zone) IS 'Queues the retry of a failed or timed-out execution when its job''s policy allows it: retries left, error kind (or exception class) in retry_on, not a config, permanent or cancelled error, job not inactive. The retry runs after edm.job_retry_delay(). At most one retry per execution.';
REVOKE ALL ON FUNCTION edm.job_schedule_retry(bigint,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_set_next_run(p_job_id bigint, p_due timestamp with time zone, p_next_run_at timestamp with time zone, p_reason text DEFAULT NULL::text)
 RETURNS boolean
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  WITH upd AS (
    UPDATE edm.jobs j
    SET next_run_at = p_next_run_at,
        status = CASE WHEN p_next_run_at IS NULL THEN 'inactive' ELSE 'active' END,
        inactive_reason = CASE WHEN p_next_run_at IS NULL
                               THEN left(coalesce(p_reason, 'deactivated by a runner'), 500) END,
        updated_at = now()
    WHERE j.job_id = p_job_id AND j.status = 'active' AND j.next_run_at = p_due
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM upd);
$function$;
COMMENT ON FUNCTION edm.job_set_next_run(bigint,timestamp with time zone,timestamp with time zone,text) IS 'Moves the next run of an active job from p_due to p_next_run_at without firing (compare-and-set, like edm.job_fire); NULL deactivates the job with p_reason. Runners use it for a job whose stored schedule can no longer be computed. Returns whether the job was changed.';
REVOKE ALL ON FUNCTION edm.job_set_next_run(bigint,timestamp with time zone,timestamp with time zone,text) FROM PUBLIC;

CREATE FUNCTION edm.job_stop(p_job_id bigint, p_user_id text DEFAULT NULL::text, p_cancel_running boolean DEFAULT false, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(cancelled_pending integer, cancelled_running integer)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
  v_now     timestamptz := coalesce(p_now, now());
  v_pending integer;
  v_running bigint[];
BEGIN
  BEGIN
    -- Lock order: executions, then the job.
    PERFORM 1 FROM edm.job_executions e
    WHERE e.job_id = p_job_id AND e.status IN ('pending', 'running')
    ORDER BY e.execution_id FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  PERFORM edm.lock_job(p_job_id, p_user_id);
  UPDATE edm.jobs j SET status = 'inactive', inactive_reason = 'stopped', next_run_at = NULL,
                        updated_at = now()
  WHERE j.job_id = p_job_id;

  UPDATE edm.job_executions e
  SET status = 'cancelled', finished_at = v_now, error = 'job stopped', error_kind = 'cancelled',
      error_code = 'CANCELLED'
  WHERE e.job_id = p_job_id AND e.status = 'pending';
  GET DIAGNOSTICS v_pending = ROW_COUNT;

  IF p_cancel_running THEN
    WITH c AS (
      UPDATE edm.job_executions e
      SET status = 'cancelled', finished_at = v_now, lease_expires_at = NULL,
          cancel_requested_at = v_now, error = 'job stopped', error_kind = 'cancelled',
          error_code = 'CANCELLED'
      WHERE e.job_id = p_job_id AND e.status = 'running'
      RETURNING e.execution_id)
    SELECT coalesce(array_agg(c.execution_id), '{}') INTO v_running FROM c;
    UPDATE edm.jobs j SET running_count = greatest(j.running_count - cardinality(v_running), 0)
    WHERE j.job_id = p_job_id;
    PERFORM pg_notify('edm_jobs_cancel', x::text) FROM unnest(v_running) x;
  ELSE
    v_running := '{}';
  END IF;
  RETURN QUERY SELECT v_pending, cardinality(v_running);
END;
$function$;
COMMENT ON FUNCTION edm.job_stop(bigint,text,boolean,timestamp with time zone) IS 'Stops a job: inactive (reason stopped), no next run, pending executions cancelled; running ones too when p_cancel_running (their runners are told through NOTIFY edm_jobs_cancel). Returns how many were cancelled.';
REVOKE ALL ON FUNCTION edm.job_stop(bigint,text,boolean,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_trigger(p_job_id bigint, p_user_id text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now    timestamptz := coalesce(p_now, now());
  v_job    record;
  v_active integer;
  v_id     bigint;
BEGIN
  v_job := edm.lock_job(p_job_id, p_user_id);
  SELECT count(*) INTO v_active FROM edm.job_executions e
  WHERE e.job_id = p_job_id AND e.status IN ('pending', 'running');
  IF v_active >= v_job.max_concurrent THEN
    RAISE EXCEPTION 'job % already has % pending or running execution(s) (max_concurrent %)',
      p_job_id, v_active, v_job.max_concurrent USING ERRCODE = 'ED011';
  END IF;
  INSERT INTO edm.job_executions (job_id, user_id, trigger, status, priority, run_after, created_at)
  VALUES (p_job_id, v_job.user_id, 'manual', 'pending', v_job.priority, v_now, v_now)
  RETURNING execution_id INTO v_id;
  PERFORM pg_notify('edm_jobs', 'manual:' || p_job_id);
  RETURN v_id;
END;
$function$;
COMMENT ON FUNCTION edm.job_trigger(bigint,text,timestamp with time zone) IS 'Queues a manual run of a job now, whatever its status or schedule (it does not move next_run_at). ED010 unknown job, ED011 when max_concurrent executions are already pending or running, ED013 when the job stays locked beyond the session''s lock_timeout (the Python API sets one).';
REVOKE ALL ON FUNCTION edm.job_trigger(bigint,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.job_update(p_job_id bigint, p_job jsonb, p_reschedule boolean, p_next_run_at timestamp with time zone, p_expected_updated_at timestamp with time zone, p_user_id text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_job record;
BEGIN
  IF p_job IS NULL OR jsonb_typeof(p_job) <> 'object' THEN
    RAISE EXCEPTION 'job_update: the job must be a JSON object' USING ERRCODE = 'ED012';
  END IF;
  v_job := edm.lock_job(p_job_id, p_user_id);
  IF v_job.updated_at IS DISTINCT FROM p_expected_updated_at THEN
    RETURN false;  -- changed since the caller read it: read again and retry
  END IF;
  UPDATE edm.jobs j
  SET name = r.name, description = r.description, kind = r.kind, target = r.target,
      cron_expr = r.cron_expr, timezone = r.timezone, start_at = r.start_at, end_at = r.end_at,
      max_executions = r.max_executions, priority = r.priority,
      max_concurrent = r.max_concurrent, timeout_seconds = r.timeout_seconds,
      max_retries = r.max_retries, retry_delay_seconds = r.retry_delay_seconds,
      retry_backoff = r.retry_backoff, retry_max_delay_seconds = r.retry_max_delay_seconds,
      retry_on = r.retry_on, misfire_policy = r.misfire_policy,
      misfire_grace_seconds = r.misfire_grace_seconds, tags = r.tags,
      status = CASE
        WHEN j.status <> 'active' THEN j.status
        WHEN r.max_executions IS NOT NULL AND j.run_count >= r.max_executions THEN 'inactive'
        WHEN p_reschedule AND p_next_run_at IS NULL THEN 'inactive'
        ELSE 'active' END,
      inactive_reason = CASE
        WHEN j.status <> 'active' THEN j.inactive_reason
        WHEN r.max_executions IS NOT NULL AND j.run_count >= r.max_executions
          THEN 'max_executions reached'
        WHEN p_reschedule AND p_next_run_at IS NULL THEN 'end_at reached'
        END,
      next_run_at = CASE
        WHEN j.status <> 'active' THEN j.next_run_at
        WHEN r.max_executions IS NOT NULL AND j.run_count >= r.max_executions THEN NULL
        WHEN p_reschedule THEN p_next_run_at
        ELSE j.next_run_at END,
      updated_at = greatest(v_now, j.updated_at + interval '1 microsecond')
  FROM jsonb_populate_record(NULL::edm.jobs, p_job) r
  WHERE j.job_id = p_job_id;
  RETURN true;
END;
$function$;
COMMENT ON FUNCTION edm.job_update(bigint,jsonb,boolean,timestamp with time zone,timestamp with time zone,text,timestamp with time zone) IS 'Replaces the settings of a job with those of p_job (JSON keyed by column names; every setting must be given). With p_reschedule, an active job''s next run becomes p_next_run_at (computed by the caller with cronsim; NULL ends it: end_at reached); a job that already fired max_executions times becomes inactive. Optimistic: returns false, changing nothing, when updated_at is no longer p_expected_updated_at (the caller reads again and retries). ED010 unknown job, ED013 lock timeout.';
REVOKE ALL ON FUNCTION edm.job_update(bigint,jsonb,boolean,timestamp with time zone,timestamp with time zone,text,timestamp with time zone) FROM PUBLIC;

CREATE FUNCTION edm.jobs_check_write()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_max     integer;
  v_n       bigint;
  v_users jsonb;
BEGIN
  IF NEW.kind = 'shell'
     AND (TG_OP = 'INSERT' OR OLD.kind IS DISTINCT FROM NEW.kind OR OLD.target IS DISTINCT FROM NEW.target
          OR OLD.user_id IS DISTINCT FROM NEW.user_id) THEN
    IF NOT coalesce((SELECT (c.value #>> '{}')::boolean FROM edm.config c
                     WHERE c.key = 'jobs.shell_enabled'), false) THEN
      RAISE EXCEPTION 'shell jobs are disabled: set jobs.shell_enabled to true to allow them'
        USING ERRCODE = 'ED012';
    END IF;
    IF NEW.user_id IS NOT NULL THEN
      SELECT (c.value #>> '{}')::jsonb INTO v_users FROM edm.config c
      WHERE c.key = 'jobs.shell_users';
      IF NOT coalesce(v_users ? NEW.user_id OR v_users ? '*', false) THEN
        RAISE EXCEPTION 'shell jobs are not allowed for user %: add it to jobs.shell_users',
          quote_literal(NEW.user_id) USING ERRCODE = 'ED012';
      END IF;
    END IF;
  END IF;
  IF NEW.user_id IS NOT NULL AND (TG_OP = 'INSERT' OR OLD.user_id IS DISTINCT FROM NEW.user_id) THEN
    -- Serialise job creation per user, so two concurrent creations cannot
    -- both take the user's last slot.
    PERFORM pg_advisory_xact_lock(hashtextextended('edm.jobs.user:' || NEW.user_id, 0));
    v_max := edm.config_int('jobs.max_jobs_per_user');
    SELECT count(*) INTO v_n FROM edm.jobs j WHERE j.user_id = NEW.user_id;
    IF v_n >= v_max THEN
      RAISE EXCEPTION 'user % already has % jobs (jobs.max_jobs_per_user = %)',
        NEW.user_id, v_n, v_max USING ERRCODE = 'ED014';
    END IF;
  END IF;
  RETURN NEW;
END;
$function$;
COMMENT ON FUNCTION edm.jobs_check_write() IS 'Trigger: refuses shell jobs unless jobs.shell_enabled, and a user''s shell job unless the user is in jobs.shell_users (ED012); refuses a user''s job beyond jobs.max_jobs_per_user (ED014, serialised per user by an advisory lock).';
REVOKE ALL ON FUNCTION edm.jobs_check_write() FROM PUBLIC;

CREATE FUNCTION edm.jobs_notify()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
  -- Only when the earliest due time may have moved earlier: firing moves
  -- next_run_at later and so wakes nobody.
  IF NEW.status = 'active'
     AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'active'
          OR NEW.next_run_at < OLD.next_run_at) THEN
    PERFORM pg_notify('edm_jobs', 'job:' || NEW.job_id);
  END IF;
  RETURN NULL;
END;
$function$;
COMMENT ON FUNCTION edm.jobs_notify() IS 'Trigger: NOTIFY edm_jobs when a job becomes active or its next run moves earlier, so sleeping runners recompute their wake-up time.';
REVOKE ALL ON FUNCTION edm.jobs_notify() FROM PUBLIC;

CREATE VIEW edm.jobs_overview AS
 SELECT job_id,
    user_id,
    name,
    kind,
    status,
    cron_expr,
    timezone,
    next_run_at,
    (next_run_at AT TIME ZONE timezone) AS next_run_local,
    last_status,
    last_finished_at,
    running_count,
    max_concurrent,
    ( SELECT count(*) AS count
           FROM edm.job_executions e
          WHERE ((e.job_id = j.job_id) AND (e.status = 'pending'::text))) AS pending_count,
    success_count,
    failure_count,
    misfire_count,
        CASE
            WHEN (status = 'paused'::text) THEN 'paused'::text
            WHEN (status = 'inactive'::text) THEN ('inactive: '::text || inactive_reason)
            WHEN (next_run_at > now()) THEN ('waiting for its next run at '::text || next_run_at)
            ELSE (('due since '::text || next_run_at) || ': no runner has fired it (are runners running?)'::text)
        END AS why_not_running,
    user_id AS tenant_id
   FROM edm.jobs j;
COMMENT ON VIEW edm.jobs_overview IS 'One line per job for DBAs: schedule, next run (UTC and local), last outcome, slots in use, queue, counters, and why it is not running right now.';
COMMENT ON COLUMN edm.jobs_overview.job_id IS 'The job.';
COMMENT ON COLUMN edm.jobs_overview.user_id IS 'Owning user (NULL: a platform job).';
COMMENT ON COLUMN edm.jobs_overview.name IS 'Job name.';
COMMENT ON COLUMN edm.jobs_overview.kind IS 'function, http, shell or launch_campaign.';
COMMENT ON COLUMN edm.jobs_overview.status IS 'active, paused or inactive.';
COMMENT ON COLUMN edm.jobs_overview.cron_expr IS 'Cron expression.';
COMMENT ON COLUMN edm.jobs_overview.timezone IS 'Time zone of the schedule.';
COMMENT ON COLUMN edm.jobs_overview.next_run_at IS 'Next run (instant).';
COMMENT ON COLUMN edm.jobs_overview.next_run_local IS 'Next run as wall-clock time in the job''s time zone.';
COMMENT ON COLUMN edm.jobs_overview.last_status IS 'Status of the latest finished execution.';
COMMENT ON COLUMN edm.jobs_overview.last_finished_at IS 'When it finished.';
COMMENT ON COLUMN edm.jobs_overview.running_count IS 'Executions running now.';
COMMENT ON COLUMN edm.jobs_overview.max_concurrent IS 'Most executions allowed to run at once.';
COMMENT ON COLUMN edm.jobs_overview.pending_count IS 'Executions queued (manual runs, retries, catch-up runs).';
COMMENT ON COLUMN edm.jobs_overview.success_count IS 'Executions that succeeded.';
COMMENT ON COLUMN edm.jobs_overview.failure_count IS 'Executions that failed or timed out.';
COMMENT ON COLUMN edm.jobs_overview.misfire_count IS 'Occurrences not run because of downtime.';
COMMENT ON COLUMN edm.jobs_overview.why_not_running IS 'Why no execution of the job is starting now.';
COMMENT ON COLUMN edm.jobs_overview.tenant_id IS 'Deprecated: the older name of user_id, kept for a release.';

CREATE TRIGGER jobs_check_write BEFORE INSERT OR UPDATE OF kind, target, user_id ON edm.jobs FOR EACH ROW EXECUTE FUNCTION edm.jobs_check_write();

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF status, next_run_at ON edm.jobs FOR EACH ROW EXECUTE FUNCTION edm.jobs_notify();

CREATE TRIGGER jobs_audit AFTER INSERT OR DELETE ON edm.jobs FOR EACH ROW EXECUTE FUNCTION edm.audit_row('job');

CREATE TRIGGER jobs_audit_upd AFTER UPDATE ON edm.jobs FOR EACH ROW WHEN ((((((((((((((((((((((((old.user_id IS DISTINCT FROM new.user_id) OR (old.name IS DISTINCT FROM new.name)) OR (old.description IS DISTINCT FROM new.description)) OR (old.kind IS DISTINCT FROM new.kind)) OR (old.target IS DISTINCT FROM new.target)) OR (old.cron_expr IS DISTINCT FROM new.cron_expr)) OR (old.timezone IS DISTINCT FROM new.timezone)) OR (old.start_at IS DISTINCT FROM new.start_at)) OR (old.end_at IS DISTINCT FROM new.end_at)) OR (old.max_executions IS DISTINCT FROM new.max_executions)) OR (old.status IS DISTINCT FROM new.status)) OR (old.inactive_reason IS DISTINCT FROM new.inactive_reason)) OR (old.priority IS DISTINCT FROM new.priority)) OR (old.max_concurrent IS DISTINCT FROM new.max_concurrent)) OR (old.timeout_seconds IS DISTINCT FROM new.timeout_seconds)) OR (old.max_retries IS DISTINCT FROM new.max_retries)) OR (old.retry_delay_seconds IS DISTINCT FROM new.retry_delay_seconds)) OR (old.retry_backoff IS DISTINCT FROM new.retry_backoff)) OR (old.retry_max_delay_seconds IS DISTINCT FROM new.retry_max_delay_seconds)) OR (old.retry_on IS DISTINCT FROM new.retry_on)) OR (old.misfire_policy IS DISTINCT FROM new.misfire_policy)) OR (old.misfire_grace_seconds IS DISTINCT FROM new.misfire_grace_seconds)) OR (old.tags IS DISTINCT FROM new.tags))) EXECUTE FUNCTION edm.audit_row('job');

-- ==========================================================================
-- Security
-- Least privilege: SECURITY DEFINER on every writing function, roles and their grants.
-- ==========================================================================

CREATE FUNCTION edm.harden_functions()
 RETURNS integer
 LANGUAGE plpgsql
AS $function$
DECLARE
  f regprocedure;
  v_n integer := 0;
BEGIN
  FOR f IN
    SELECT p.oid::regprocedure FROM pg_proc p
    WHERE p.pronamespace = 'edm'::regnamespace AND p.prokind = 'f'
      AND p.provolatile = 'v' AND p.prorettype <> 'trigger'::regtype
      AND p.proname NOT IN ('harden_functions', 'install_roles', 'share_staged')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', f);
    v_n := v_n + 1;
  END LOOP;
  -- Read-only functions that look at tables the calling role may not read.
  FOR f IN
    SELECT p.oid::regprocedure FROM pg_proc p
    WHERE p.pronamespace = 'edm'::regnamespace
      AND p.proname IN ('next_wakeup', 'task_wait_reason', 'job_next_wakeup')
  LOOP
    EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', f);
    v_n := v_n + 1;
  END LOOP;
  EXECUTE 'REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA edm FROM PUBLIC';
  RETURN v_n;
END;
$function$;
COMMENT ON FUNCTION edm.harden_functions() IS 'Makes every volatile (writing) function of schema edm SECURITY DEFINER with search_path pg_catalog, pg_temp, and revokes EXECUTE from PUBLIC. Run by this migration; later migrations that add functions call it again.';
REVOKE ALL ON FUNCTION edm.harden_functions() FROM PUBLIC;

CREATE FUNCTION edm.share_staged(p_table text)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_owner text := (SELECT n.nspowner::regrole::text FROM pg_namespace n WHERE n.nspname = 'edm');
BEGIN
  IF p_table NOT IN ('edm_stage_recipients', 'edm_stage_contacts') THEN
    RAISE EXCEPTION 'not a staging table: %', p_table USING ERRCODE = 'ED005';
  END IF;
  IF v_owner <> current_user THEN
    EXECUTE format('GRANT SELECT ON pg_temp.%I TO %I', p_table, v_owner);
  END IF;
END;
$function$;
COMMENT ON FUNCTION edm.share_staged(text) IS 'Grants the edm schema owner (whose rights the SECURITY DEFINER functions run with) SELECT on the caller''s session staging table p_table. Runs with the caller''s rights.';
REVOKE ALL ON FUNCTION edm.share_staged(text) FROM PUBLIC;

CREATE FUNCTION edm.install_roles(p_dispatcher text DEFAULT 'edm_dispatcher'::text, p_app text DEFAULT 'edm_app'::text, p_monitor text DEFAULT 'edm_monitor'::text)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
DECLARE
  v_role text;
  f regprocedure;
  -- What each role may EXECUTE (every overload of these names).
  v_dispatcher_fns text[] := ARRAY['check_reputation', 'reputation_rates', 
    'claim', 'complete', 'expire_leases', 'next_wakeup', 'run_sweeps', 'take_alerts',
    'start_due_tasks', 'task_wait_reason', 'service_is_ready', 'service_sent_today',
    'job_claim', 'job_fire', 'job_finish', 'job_complete', 'job_progress', 'job_schedule_retry',
    'job_expire_runs', 'job_next_wakeup', 'job_purge_executions', 'job_due', 'job_set_next_run',
    'claim_v2', 'renew_leases', 'release_holds', 'next_wakeup_v2', 'report_pace', 'sites_of'];
  v_app_fns text[] := ARRAY['set_service_warmup', 'warmup_ramp', 'warmup_ceiling', 'warmup_ramp_problem', 'set_reply_rule', 'enable_reply_rule', 'delete_reply_rule', 'match_reply_rule', 'lift_site_suspension', 'reply_enhanced_code', 'reply_transport_code', 'set_global_limits', 'set_site_limits', 'set_user_limits', 'set_task_limits', 'set_task_transactional', 'shaping_as_limit', 'limit_next', 'limit_bucket_ms', 'epoch_ms', 'shaping_key', 'set_site_domains', 'cache_site_domains', 'unmapped_domains', 'suspend_site', 'suspended_sites', 'site_of', 'sites_of', 'email_domain', 'headers_problem', 'unsubscribe', 'cancel_pending_to', 'record_feedback', 'parse_message_id', 'check_reputation', 'reputation_rates', 'reputation_resume_service', 'reputation_resume_user', 
    'upsert_user', 'set_user_quota', 'create_service', 'update_service', 'grant_service',
    'revoke_service', 'merge_staged_contacts', 'set_contact_tags', 'delete_tag',
    'add_suppression', 'remove_suppression', 'create_task_from_staged', 'create_task_from_rule',
    'expand_task', 'pause_task', 'resume_task', 'cancel_task', 'task_wait_reason', 'config_set',
    'share_staged', 'email_problem', 'is_valid_email', 'normalize_email', 'is_valid_timezone',
    'rule_matches', 'service_sent_today', 'service_is_ready',
    'job_create', 'job_update', 'job_delete', 'job_trigger', 'job_pause', 'job_resume',
    'job_stop', 'job_cancel_execution', 'job_validate', 'set_service_limits'];
  v_monitor_fns text[] := ARRAY['warmup_ramp', 'warmup_ceiling', 'warmup_ramp_problem', 'match_reply_rule', 'reply_enhanced_code', 'reply_transport_code', 'task_site_wait', 'shaping_as_limit', 'limit_next', 'limit_bucket_ms', 'epoch_ms', 'shaping_key', 'suspended_sites', 'site_of', 'email_domain', 'reputation_rates', 'task_wait_reason', 'service_sent_today', 'service_is_ready'];
BEGIN
  FOREACH v_role IN ARRAY ARRAY[p_dispatcher, p_app, p_monitor] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = v_role) THEN
      EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA edm TO %I', v_role);
  END LOOP;

  -- Monitoring: read everything, change nothing.
  EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA edm TO %I', p_monitor);

  -- Dispatcher: claim / complete / sweep through functions; read what
  -- rendering needs; keep its own heartbeat row.
  EXECUTE format('GRANT SELECT ON edm.services, edm.templates, edm.contacts, edm.config, edm.config_renamed, '
                 'edm.tasks, edm.system_health, edm.jobs, edm.job_executions, edm.service_limits TO %I', p_dispatcher);
  EXECUTE format('GRANT SELECT, INSERT, UPDATE ON edm.dispatchers TO %I', p_dispatcher);

  -- Host application: everything through functions; read its objects.
  EXECUTE format('GRANT SELECT ON edm.users, edm.services, edm.grants, edm.tasks, edm.templates, '
                 'edm.config, edm.config_renamed, edm.task_progress, edm.service_warmups, edm.service_warmup_status, edm.reply_rules, edm.shaping_actions, edm.site_suspension_status, edm.shaping_limits, edm.shaping_limit_status, edm.site_status, edm.sites, edm.site_domains, edm.site_suspensions, edm.reputation_status, edm.feedback_events, edm.service_status, edm.system_health, '
                 'edm.task_wait_reasons, edm.alerts, edm.jobs, edm.job_executions, '
                 'edm.jobs_overview, edm.service_limits, edm.service_limit_status, '
                 'edm.possible_duplicates TO %I', p_app);

  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
           WHERE p.pronamespace = 'edm'::regnamespace AND p.proname = ANY (v_dispatcher_fns) LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, p_dispatcher);
  END LOOP;
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
           WHERE p.pronamespace = 'edm'::regnamespace AND p.proname = ANY (v_app_fns) LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, p_app);
  END LOOP;
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
           WHERE p.pronamespace = 'edm'::regnamespace AND p.proname = ANY (v_monitor_fns) LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, p_monitor);
  END LOOP;
END;
$function$;
COMMENT ON FUNCTION edm.install_roles(text,text,text) IS 'Creates (when missing) the NOLOGIN group roles for the dispatcher, the host application and monitoring, and grants each exactly what its job needs. Needs CREATEROLE (or existing roles) and the schema owner''s rights; idempotent. Grant the groups to your login roles: GRANT edm_dispatcher TO my_sidecar_login.';
REVOKE ALL ON FUNCTION edm.install_roles(text,text,text) FROM PUBLIC;

RESET check_function_bodies;
RESET search_path;
