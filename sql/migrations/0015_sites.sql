-- 0015_sites: destination sites (issue 15, point 1: the vocabulary).
--
-- Mailbox providers throttle per sender and per receiving site, not per
-- domain: gmail.com and googlemail.com are one site, so are the forty
-- domains of Microsoft's consumer mail. A recipient's site is found from the
-- domain of its address in edm.site_domains (shipped defaults for the large
-- providers, editable; a host hook may resolve unknown domains, by an MX
-- lookup say, and cache the answer here). A recipient whose domain is not
-- mapped has no site: site limits and suspensions do not apply to it.
--
-- Nothing is stored on subtasks: the claim computes the site from the
-- address it already reads, so a mapping added later applies to recipients
-- already queued. Later migrations build on this: limits per site and per
-- (service, site) (0016) and reply rules that suspend a (service, site)
-- pair (0017).

CREATE TABLE edm.sites (
  site        text PRIMARY KEY CHECK (site ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
  description text NOT NULL DEFAULT '' CHECK (length(description) <= 500),
  created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE edm.sites IS
  'Destination sites: a receiving mail system that throttles as one (google, microsoft, yahoo...). Recipient domains map to sites in edm.site_domains; limits and suspensions are set per site. See docs/explanation/traffic-shaping.md.';
COMMENT ON COLUMN edm.sites.site IS 'Name of the site (lower case letters, digits, _ . -; at most 64).';
COMMENT ON COLUMN edm.sites.description IS 'Free text: whose mail system this is.';
COMMENT ON COLUMN edm.sites.created_at IS 'When the site was defined.';

CREATE TABLE edm.site_domains (
  domain      text PRIMARY KEY
              CHECK (domain = lower(domain) AND length(domain) BETWEEN 1 AND 253
                     AND domain !~ '[[:space:][:cntrl:]@]'),
  site        text NOT NULL REFERENCES edm.sites ON UPDATE CASCADE ON DELETE CASCADE,
  source      text NOT NULL DEFAULT 'admin' CHECK (source IN ('shipped', 'admin', 'resolved')),
  resolved_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX site_domains_site_idx ON edm.site_domains (site);
COMMENT ON INDEX edm.site_domains_site_idx IS 'The domains of a site (listing a site, and the ON DELETE CASCADE from edm.sites).';
COMMENT ON TABLE edm.site_domains IS
  'Which site a recipient domain belongs to. shipped rows come with edm-sched, admin rows are set by the host or a DBA (edm.set_site_domains), resolved rows were answered by the host''s resolver hook for a domain not mapped before (edm.cache_site_domains). A domain not listed has no site.';
COMMENT ON COLUMN edm.site_domains.domain IS 'Recipient domain, lower case, exactly as after the @ (subdomains are separate domains).';
COMMENT ON COLUMN edm.site_domains.site IS 'Site the domain belongs to.';
COMMENT ON COLUMN edm.site_domains.source IS 'shipped (a default of edm-sched), admin (set by the host or a DBA) or resolved (cached answer of the host''s resolver hook).';
COMMENT ON COLUMN edm.site_domains.resolved_at IS 'When the mapping was set or last resolved (a host may re-resolve old resolved rows).';

CREATE FUNCTION edm.email_domain(p_email text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN lower(substring(p_email FROM '@([^@]*)$'));
COMMENT ON FUNCTION edm.email_domain(text) IS
  'The domain of an address (after its last @), lower case; NULL without an @.';

CREATE FUNCTION edm.site_of(p_email text)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN (SELECT d.site FROM edm.site_domains d WHERE d.domain = edm.email_domain(p_email));
COMMENT ON FUNCTION edm.site_of(text) IS
  'The site a recipient address belongs to (edm.site_domains, by the domain after its last @), or NULL when its domain is not mapped.';

CREATE FUNCTION edm.set_site_domains(p_site text, p_domains text[], p_description text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
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
$$;
COMMENT ON FUNCTION edm.set_site_domains(text, text[], text) IS
  'Defines site p_site (created if new; its description replaced when p_description is given) and maps each of p_domains to it (moving a domain from another site). Returns how many domains were mapped. Raises ED005 for a bad name or domain (nothing is changed).';

CREATE FUNCTION edm.cache_site_domains(p_domains text[], p_sites text[], p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
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
$$;
COMMENT ON FUNCTION edm.cache_site_domains(text[], text[], timestamptz) IS
  'Caches the host resolver hook''s answers: maps each p_domains[i] to site p_sites[i] (creating unknown sites) as source resolved. Never overrides a shipped or admin mapping. Returns how many rows were written.';

CREATE FUNCTION edm.unmapped_domains(p_domains text[])
RETURNS SETOF text
LANGUAGE sql STABLE
BEGIN ATOMIC
  SELECT DISTINCT lower(x.d) AS domain FROM unnest(p_domains) x(d)
  WHERE x.d IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM edm.site_domains sd WHERE sd.domain = lower(x.d))
  ORDER BY 1;
END;
COMMENT ON FUNCTION edm.unmapped_domains(text[]) IS
  'Those of p_domains (lower-cased, distinct) that edm.site_domains does not map: what a resolver hook has to answer.';

-- Shipped defaults: the consumer mailbox providers that throttle hardest.
-- Business domains hosted by them (Workspace, Microsoft 365) are found only
-- by a resolver hook (their MX), see docs/howto/shape-traffic.md.
INSERT INTO edm.sites (site, description) VALUES
  ('google', 'Gmail and Google Workspace'),
  ('microsoft', 'Outlook.com, Hotmail, Live, MSN and Microsoft 365'),
  ('yahoo', 'Yahoo Mail and AOL'),
  ('apple', 'iCloud Mail'),
  ('qq', 'Tencent QQ Mail'),
  ('netease', 'NetEase (163, 126, yeah.net)'),
  ('mailru', 'Mail.ru Group'),
  ('gmx', 'GMX and WEB.DE (United Internet)'),
  ('comcast', 'Comcast Xfinity');
INSERT INTO edm.site_domains (domain, site, source)
SELECT d, s, 'shipped' FROM (VALUES
  ('gmail.com', 'google'), ('googlemail.com', 'google'),
  ('outlook.com', 'microsoft'), ('hotmail.com', 'microsoft'), ('live.com', 'microsoft'),
  ('msn.com', 'microsoft'), ('hotmail.co.uk', 'microsoft'), ('hotmail.fr', 'microsoft'),
  ('hotmail.de', 'microsoft'), ('hotmail.it', 'microsoft'), ('hotmail.es', 'microsoft'),
  ('outlook.fr', 'microsoft'), ('outlook.de', 'microsoft'), ('live.co.uk', 'microsoft'),
  ('live.fr', 'microsoft'), ('passport.com', 'microsoft'),
  ('yahoo.com', 'yahoo'), ('yahoo.co.uk', 'yahoo'), ('yahoo.fr', 'yahoo'), ('yahoo.de', 'yahoo'),
  ('yahoo.co.jp', 'yahoo'), ('ymail.com', 'yahoo'), ('rocketmail.com', 'yahoo'),
  ('aol.com', 'yahoo'), ('aim.com', 'yahoo'), ('verizon.net', 'yahoo'),
  ('icloud.com', 'apple'), ('me.com', 'apple'), ('mac.com', 'apple'),
  ('qq.com', 'qq'), ('foxmail.com', 'qq'),
  ('163.com', 'netease'), ('126.com', 'netease'), ('yeah.net', 'netease'), ('188.com', 'netease'),
  ('mail.ru', 'mailru'), ('bk.ru', 'mailru'), ('inbox.ru', 'mailru'), ('list.ru', 'mailru'),
  ('internet.ru', 'mailru'),
  ('gmx.de', 'gmx'), ('gmx.net', 'gmx'), ('gmx.com', 'gmx'), ('gmx.at', 'gmx'), ('gmx.ch', 'gmx'),
  ('web.de', 'gmx'),
  ('comcast.net', 'comcast')) AS v(d, s);

-- ---------------------------------------------------------------------------
-- Suspensions: a (service, site) pair told to slow down
-- ---------------------------------------------------------------------------

CREATE TABLE edm.site_suspensions (
  service_id   bigint NOT NULL REFERENCES edm.services ON DELETE CASCADE,
  site         text NOT NULL REFERENCES edm.sites ON UPDATE CASCADE ON DELETE CASCADE,
  until        timestamptz NOT NULL,
  level        integer NOT NULL DEFAULT 1 CHECK (level BETWEEN 1 AND 1000),
  reason       text NOT NULL CHECK (length(reason) <= 2000),
  created_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (service_id, site)
);
CREATE INDEX site_suspensions_until_idx ON edm.site_suspensions (until);
COMMENT ON INDEX edm.site_suspensions_until_idx IS 'Suspensions by end (which are in force at a time; sweeping old ones).';
COMMENT ON TABLE edm.site_suspensions IS
  'A (service, site) pair that must not send until a time: set by a reply rule (a throttling answer such as Gmail''s 421 4.7.28) or by hand. The claim skips the pair''s recipients and serves the service''s other sites. A row past its until no longer applies (it expires by itself) but keeps its level for escalation on repeats.';
COMMENT ON COLUMN edm.site_suspensions.service_id IS 'Service suspended for the site.';
COMMENT ON COLUMN edm.site_suspensions.site IS 'Site the service must not send to.';
COMMENT ON COLUMN edm.site_suspensions.until IS 'End of the suspension (it no longer applies from then).';
COMMENT ON COLUMN edm.site_suspensions.level IS 'How many times in a row the pair was suspended (escalation: each repeat may last longer).';
COMMENT ON COLUMN edm.site_suspensions.reason IS 'Why: the rule and the reply that caused the suspension, or the text given by hand.';
COMMENT ON COLUMN edm.site_suspensions.created_at IS 'When the current suspension started.';

CREATE FUNCTION edm.suspended_sites(p_service_id bigint, p_now timestamptz DEFAULT NULL)
RETURNS text[]
LANGUAGE sql STABLE
RETURN ARRAY(SELECT x.site FROM edm.site_suspensions x
             WHERE x.service_id = p_service_id AND x.until > coalesce(p_now, now())
             ORDER BY x.site);
COMMENT ON FUNCTION edm.suspended_sites(bigint, timestamptz) IS
  'The sites service p_service_id must not send to at p_now (its suspensions not yet expired).';

CREATE FUNCTION edm.suspend_site(p_service_id bigint, p_site text, p_until timestamptz,
                                 p_reason text DEFAULT 'suspended by hand')
RETURNS void
LANGUAGE plpgsql
AS $$
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
$$;
COMMENT ON FUNCTION edm.suspend_site(bigint, text, timestamptz, text) IS
  'Suspends (service, site) until p_until by hand (an until in the past lifts it). Raises ED001 for an unknown service or site.';

-- ---------------------------------------------------------------------------
-- Roles: the new names in the group roles' grants (the pattern of 0009)
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.patch_function(p_fn regprocedure, p_patch text[], p_context text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
  v_def text := pg_get_functiondef(p_fn);
  i integer;
BEGIN
  FOR i IN 1 .. coalesce(array_length(p_patch, 1), 0) LOOP
    IF position(p_patch[i][1] IN v_def) = 0 THEN
      RAISE EXCEPTION '%: % has no %; patch it by hand', p_context, p_fn, p_patch[i][1];
    END IF;
    v_def := replace(v_def, p_patch[i][1], p_patch[i][2]);
  END LOOP;
  EXECUTE v_def;
END;
$fn$;
COMMENT ON FUNCTION edm.patch_function(regprocedure, text[], text) IS
  'For migrations: rewrites function p_fn as the catalog has it now, replacing each p_patch[i][1] by p_patch[i][2], so that what earlier migrations put in it is kept; fails (naming p_context, the migration) when a text to replace is not found.';

CREATE FUNCTION edm.extend_roles(p_patch text[], p_context text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
  PERFORM edm.patch_function('edm.install_roles(text, text, text)'::regprocedure, p_patch, p_context);
  -- Databases whose roles were installed already get the new grants now (the
  -- default role names; with other names, call edm.install_roles(...) again).
  IF (SELECT count(*) FROM pg_roles r
      WHERE r.rolname IN ('edm_dispatcher', 'edm_app', 'edm_monitor')) = 3 THEN
    PERFORM edm.install_roles();
  END IF;
END;
$fn$;
COMMENT ON FUNCTION edm.extend_roles(text[], text) IS
  'For migrations: adds a migration''s names to the grant lists of edm.install_roles (edm.patch_function) and re-applies the grants where the default roles exist.';

SELECT edm.extend_roles(ARRAY[
    ['v_app_fns text[] := ARRAY[',
     'v_app_fns text[] := ARRAY[''set_site_domains'', ''cache_site_domains'', ''unmapped_domains'', ''suspend_site'', ''suspended_sites'', ''site_of'', ''email_domain'', '],
    ['v_monitor_fns text[] := ARRAY[',
     'v_monitor_fns text[] := ARRAY[''suspended_sites'', ''site_of'', ''email_domain'', '],
    ['edm.config, edm.task_progress, ',
     'edm.config, edm.task_progress, edm.sites, edm.site_domains, edm.site_suspensions, ']], '0015');

SELECT edm.harden_functions();
