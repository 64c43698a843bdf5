-- 0023_site_release: sends already queued for a site that was just suspended
-- are handed back instead of sent into the same refusal (issue 15).
--
-- A reply rule that suspends a (service, site) pair (edm.complete, 0017) stops
-- the claim from handing out that site's recipients on that service; the sends
-- a dispatcher had already claimed and queued in the service's lane still went
-- out, each into the provider's same throttling reply. An MTA stops sending to
-- a site the moment it is told to slow down. The dispatcher now hands those
-- queued sends back (the `released` outcome: no attempt, no quota unit) as soon
-- as the completion names the suspension; it learns which of its queued
-- recipients belong to the site from edm.sites_of, so the site map stays the
-- database's business (a mapping added later applies to queued work too).

CREATE FUNCTION edm.sites_of(p_emails text[])
RETURNS text[]
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
RETURN (SELECT coalesce(array_agg(edm.site_of(e.email) ORDER BY e.n), '{}')
        FROM unnest(p_emails) WITH ORDINALITY AS e(email, n));

COMMENT ON FUNCTION edm.sites_of(text[]) IS
  'The site of each address of p_emails (edm.site_of), in order, NULL where its domain is not mapped. Used by the dispatcher to hand back the queued sends of a (service, site) pair a reply rule has just suspended. Runs with the owner''s rights, so the dispatcher role needs no read access to edm.site_domains.';

SELECT edm.extend_roles(ARRAY[[
  '''release_holds'', ''next_wakeup_v2'', ''report_pace'']',
  '''release_holds'', ''next_wakeup_v2'', ''report_pace'', ''sites_of'']'],
  ['''suspended_sites'', ''site_of'', ''email_domain'', ''headers_problem''',
   '''suspended_sites'', ''site_of'', ''sites_of'', ''email_domain'', ''headers_problem''']],
  '0023');

SELECT edm.harden_functions();
