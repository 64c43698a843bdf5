-- 0029_claim_batch_default: a dispatcher claims up to 200 subtasks a call by
-- default, instead of 50 (issue 14, point 4; docs/performance.md, "S1 after
-- session 10").
--
-- A claim call pays a part that does not depend on its size (ranking the
-- ready services, reading the rotation head, starting due tasks, the call
-- itself), and so does a completion. Until 0028 a claim's search for the next
-- user grew with the cube of the batch, and 50 was near the best size. Now,
-- on an S1 world (1,000 services shared by all users, no interval) one
-- dispatcher sends 16-30 % more at 200 than at 50 and two 16-33 % more; the
-- lag scenario (300 paced services) keeps lag p99 and utilisation within
-- their goals (20 / 0 ms, 99.6 / 99.8 %), with claim calls of 20 ms at p50
-- instead of 10. A claim takes only what the ready services can give within
-- the lookahead, so a paced world's claims stay as small as before. At most
-- 1,000 (what edm.claim_v2 and run_dispatcher() accept). A value an operator
-- has set is kept, unless it is 50: that cannot be told from the old default,
-- and moves to 200 with it.

UPDATE edm.config
SET default_value = '200',
    max_value = 1000,
    value = CASE WHEN value = '50' THEN '200' ELSE value END,
    description = 'Largest batch one claim call takes: up to this many slots over the ready services, each service at most what its limits allow within the lookahead. A call costs a part that does not depend on its size (ranking the ready services, reading the rotation head), so larger batches cost less per subtask where much is ready at once (docs/performance.md, "S1 after session 10").'
WHERE key = 'queue.central_batch_size';
