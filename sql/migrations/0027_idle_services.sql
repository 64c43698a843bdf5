-- 0027_idle_services: a claim no longer works through ready services that
-- have nothing to give (issue 14: S3 with several dispatchers;
-- docs/performance.md, "S3 after session 8").
--
-- A service is ready when its next slot comes within the horizon, it is under
-- its quota and nobody holds it: whether any of its grantees has work is not
-- part of it. In a mixed world late in a drain (S3: 1,000 dedicated services,
-- one user each, whose users have sent everything), those services still
-- rank first (least quota used), and every claim locked each of them and ran
-- the whole slot search on it before it reached a pool with work: about
-- 1,900 services and 90 ms a call, so that two or four dispatchers sent less
-- than one had at the start.
--
-- * A small pool (at most queue.small_pool_grantees grantees, read from its
--   grants anyway) none of whose users has claimable work is left at once,
--   before the fill and the slot search.
-- * The second ranking (all the ready services the first list did not
--   cover, ranked only when that list did not fill the batch) leaves out a
--   service none of whose grantees has claimable work. The first ranking
--   does not test it: in a busy shared pool (S1) that would be a probe for
--   each of the 1,000 ready services on every call, to leave out none.
--
-- Which subtasks a call claims, and in what order, does not change: a
-- service left out could not have given a slot (every slot goes to a grantee
-- with a claimable task). The test reads the users' claimable_tasks in the
-- claim's snapshot, as the slot search does; nothing is cached between calls,
-- so there is no flag to fall out of step with a task that becomes claimable.

SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$  v_lim      integer;$p$,
$p$  v_lim      integer;
  -- 0027: the second ranking, which leaves out services without work
  v_rest     boolean := false;$p$], [
$p$      AND s.service_id <> ALL (v_order)  -- the second ranking: all but the first list
$p$,
$p$      AND s.service_id <> ALL (v_order)  -- the second ranking: all but the first list
      -- (0027: there, only services a grantee of which has claimable work)
      AND (NOT v_rest
           OR EXISTS (SELECT 1 FROM edm.grants g JOIN edm.users u ON u.user_id = g.user_id
                      WHERE g.service_id = s.service_id AND u.claimable_tasks > 0))
$p$], [
$p$                      ORDER BY u.last_served_seq, u.user_id);
    END IF;
$p$,
$p$                      ORDER BY u.last_served_seq, u.user_id);
      -- (0027: a small pool none of whose users has work gives nothing)
      CONTINUE WHEN cardinality(v_pool) = 0;
    END IF;
$p$], [
$p$  v_lim := 2147483647;  -- the rest, in one ranking
$p$,
$p$  v_lim := 2147483647;  -- the rest, in one ranking
  v_rest := true;
$p$]], '0027');
