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
--   cover, ranked only when that list did not fill the batch) is taken a
--   chunk of 2 x batch + 8 services at a time, in its order, and each chunk
--   leaves out the services none of whose grantees has claimable work before
--   any is locked. A call tests only the chunks it reaches: tested over the
--   whole second ranking at once, the test cost S2 (20,001 services, nearly
--   all with work) about 5 us a service on every call that needed that
--   ranking. The first list is not tested: in a busy shared pool (S1) that
--   would be a probe for each of its services on every call, to leave out
--   none.
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
  -- 0027: the second ranking, the position in it of the next chunk, and the
  -- length of a chunk (that of the first list)
  v_rest     bigint[];
  v_pos      integer;
  v_chunk    integer;$p$], [
$p$  v_lim := 2 * p_batch + 8;$p$,
$p$  v_chunk := 2 * p_batch + 8;
  v_lim := v_chunk;$p$], [
$p$  <<ranked>>
  LOOP
  v_order := ARRAY($p$,
$p$  <<ranked>>
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
  v_order := ARRAY($p$], [
$p$    LIMIT v_lim);
  EXIT ranked WHEN cardinality(v_order) = 0;
$p$,
$p$    LIMIT v_lim);
  EXIT ranked WHEN cardinality(v_order) = 0;
  IF v_lim = 2147483647 THEN  -- the second ranking: taken a chunk at a time (above)
    v_rest := v_order;
    v_pos := 1;
    CONTINUE ranked;
  END IF;
  END IF;
$p$], [
$p$                      ORDER BY u.last_served_seq, u.user_id);
    END IF;
$p$,
$p$                      ORDER BY u.last_served_seq, u.user_id);
      -- (0027: a small pool none of whose users has work gives nothing)
      CONTINUE WHEN cardinality(v_pool) = 0;
    END IF;
$p$], [
$p$  EXIT ranked WHEN cardinality(c_sub) >= p_batch OR v_stop OR cardinality(v_order) < v_lim;
  v_lim := 2147483647;  -- the rest, in one ranking
$p$,
$p$  EXIT ranked WHEN cardinality(c_sub) >= p_batch OR v_stop;
  CONTINUE ranked WHEN v_rest IS NOT NULL;  -- the next chunk
  EXIT ranked WHEN cardinality(v_order) < v_lim;
  v_lim := 2147483647;  -- the rest, in one ranking
$p$]], '0027');
