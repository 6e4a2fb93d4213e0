//! Group commit: concurrent writers of one lane share a transaction.
//!
//! A commit costs a disk flush (milliseconds on PostgreSQL, the SQLite
//! file's write turn on the embedded default) however little it carries, so
//! a service whose callers each write a little is bound by commits, not by
//! work. Here writers queue per lane; whoever takes the lane's lead commits
//! everything queued so far in one go and hands each writer its own answer.
//! A lone writer leads at once, so nobody waits for company: grouping only
//! happens while a commit is already in flight.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Semaphore, oneshot};

use crate::Tasks;

/// The group's commit ended without answering this writer (its task was
/// cancelled at shutdown or panicked): the write may or may not be stored.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the commit carrying this write ended without an answer; it may or may not be stored")]
pub struct OutcomeUnknown;

/// A write waiting in its lane.
struct Pending<R, T, E> {
    request: R,
    weight: usize,
    reply: oneshot::Sender<Result<T, E>>,
}

/// One lane's queue, and the leads that commit it.
struct Lane<R, T, E> {
    queue: Mutex<VecDeque<Pending<R, T, E>>>,
    leads: Arc<Semaphore>,
}

impl<R, T, E> Lane<R, T, E> {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Pending<R, T, E>>> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The oldest writes, up to `max_weight` in all (at least one).
    fn take(&self, max_weight: usize) -> Vec<Pending<R, T, E>> {
        let mut q = self.queue();
        // A write whose caller went away while queued is dropped, never
        // committed later behind its back.
        q.retain(|p| !p.reply.is_closed());
        let mut out = Vec::new();
        let mut weight = 0;
        while let Some(front) = q.front() {
            if !out.is_empty() && weight + front.weight > max_weight {
                break;
            }
            weight += front.weight;
            if let Some(p) = q.pop_front() {
                out.push(p);
            }
        }
        out
    }
}

/// Each lane by its key.
type Lanes<K, R, T, E> = HashMap<K, Arc<Lane<R, T, E>>>;

/// Lanes keyed by `K` (an environment, a queue, or `()` for one log) of
/// writes `R` answered with `Result<T, E>`.
pub struct GroupCommit<K, R, T, E> {
    lanes: Mutex<Lanes<K, R, T, E>>,
    max_weight: usize,
    leads: usize,
    task: &'static str,
    tasks: Tasks,
}

impl<K, R, T, E> GroupCommit<K, R, T, E>
where
    K: Hash + Eq + Clone,
    R: Send + 'static,
    T: Send + 'static,
    E: From<OutcomeUnknown> + Send + 'static,
{
    /// Groups of at most `max_weight` (a lone heavier write still commits
    /// alone), one at a time per lane, committed on tasks named `task`
    /// tracked by `tasks`.
    pub fn new(task: &'static str, max_weight: usize, tasks: Tasks) -> Self {
        Self {
            lanes: Mutex::new(HashMap::new()),
            max_weight: max_weight.max(1),
            leads: 1,
            task,
            tasks,
        }
    }

    /// Lets up to `leads` groups of a lane commit at once (where the
    /// database runs transactions side by side and only flushes are worth
    /// sharing); one by default.
    #[must_use]
    pub fn with_leads(mut self, leads: usize) -> Self {
        self.leads = leads.max(1);
        self
    }

    fn lane(&self, key: &K) -> Arc<Lane<R, T, E>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match lanes.get(key) {
            Some(lane) => lane.clone(),
            None => {
                let lane = Arc::new(Lane {
                    queue: Mutex::new(VecDeque::new()),
                    leads: Arc::new(Semaphore::new(self.leads)),
                });
                lanes.insert(key.clone(), lane.clone());
                lane
            }
        }
    }

    /// Queues `request` (counting `weight` towards a group's size) in lane
    /// `key` and waits for its answer. Each time this writer takes a lead (a
    /// group may fill up before reaching its write, or another lead may have
    /// taken it; then it leads again or is answered), a copy of `commit` runs
    /// on its own task with the lane's key and the group, oldest first, and
    /// must answer each in order; so a caller that goes away mid-commit
    /// never leaves the rest of its group unanswered.
    pub async fn submit<F, Fut>(&self, key: &K, request: R, weight: usize, commit: F) -> Result<T, E>
    where
        F: FnOnce(K, Vec<R>) -> Fut + Clone,
        Fut: Future<Output = Vec<Result<T, E>>> + Send + 'static,
    {
        let lane = self.lane(key);
        let (reply, mut answer) = oneshot::channel();
        lane.queue().push_back(Pending { request, weight, reply });
        loop {
            if let Some(done) = answered(&mut answer) {
                return done;
            }
            let Ok(lead) = lane.leads.clone().acquire_owned().await else {
                // Never closed; were it, nobody could lead this write.
                return Err(OutcomeUnknown.into());
            };
            if let Some(done) = answered(&mut answer) {
                return done;
            }
            let group = lane.take(self.max_weight);
            if group.is_empty() {
                // Another lead took this write and will answer it.
                drop(lead);
                return answer.await.unwrap_or_else(|_| Err(OutcomeUnknown.into()));
            }
            let (requests, replies): (Vec<R>, Vec<_>) = group.into_iter().map(|p| (p.request, p.reply)).unzip();
            let work = (commit.clone())(key.clone(), requests);
            let (finished, done) = oneshot::channel::<()>();
            self.tasks.spawn(self.task, async move {
                let mut answers = work.await.into_iter();
                for reply in replies {
                    let answer = answers.next().unwrap_or_else(|| Err(OutcomeUnknown.into()));
                    let _ = reply.send(answer);
                }
                // Answered first: whoever takes the lead next finds its
                // answer waiting instead of leading an empty group.
                drop(lead);
                let _ = finished.send(());
                Ok::<(), std::convert::Infallible>(())
            });
            let _ = done.await;
        }
    }
}

impl<K, I, O, E> GroupCommit<K, Vec<I>, Vec<O>, E>
where
    K: Hash + Eq + Clone,
    I: Send + 'static,
    O: Send + 'static,
    E: From<OutcomeUnknown> + Send + 'static,
{
    /// [`GroupCommit::submit`] for writes made of items (messages, log
    /// entries) answered item by item: a group is committed by one call of
    /// `commit` on all its items in order, and each writer gets the answers
    /// to its own items. A failure reaches every writer through `replicate`.
    pub async fn submit_items<F, Fut>(
        &self,
        key: &K,
        items: Vec<I>,
        replicate: fn(&E) -> E,
        commit: F,
    ) -> Result<Vec<O>, E>
    where
        F: FnOnce(K, Vec<I>) -> Fut + Clone,
        Fut: Future<Output = Result<Vec<O>, E>> + Send + 'static,
    {
        let weight = items.len();
        self.submit(key, items, weight, move |key, group| {
            let sizes: Vec<usize> = group.iter().map(Vec::len).collect();
            let all = commit(key, group.into_iter().flatten().collect());
            async move { split_answers(all.await, &sizes, replicate) }
        })
        .await
    }
}

/// The answer, once a leader has sent it.
fn answered<T, E: From<OutcomeUnknown>>(answer: &mut oneshot::Receiver<Result<T, E>>) -> Option<Result<T, E>> {
    match answer.try_recv() {
        Ok(done) => Some(done),
        Err(oneshot::error::TryRecvError::Empty) => None,
        Err(oneshot::error::TryRecvError::Closed) => Some(Err(OutcomeUnknown.into())),
    }
}

/// Splits the answers of one combined write back to the writers whose
/// parts were concatenated: `sizes[i]` items belong to writer `i`. A shared
/// error reaches every writer through `replicate`.
fn split_answers<T, E, F>(
    combined: Result<Vec<T>, E>,
    sizes: &[usize],
    replicate: impl Fn(&E) -> F,
) -> Vec<Result<Vec<T>, F>> {
    match combined {
        Ok(items) => {
            let mut items = items.into_iter();
            sizes.iter().map(|&n| Ok(items.by_ref().take(n).collect())).collect()
        }
        Err(e) => sizes.iter().map(|_| Err(replicate(&e))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[derive(Debug, PartialEq)]
    enum Failure {
        Unknown,
    }

    impl From<OutcomeUnknown> for Failure {
        fn from(_: OutcomeUnknown) -> Self {
            Self::Unknown
        }
    }

    type Doubler = GroupCommit<(), u32, u32, Failure>;

    /// Commits that take `ms` each and count themselves.
    async fn submit(
        gc: &Doubler,
        commits: &Arc<AtomicUsize>,
        sizes: &Arc<Mutex<Vec<usize>>>,
        n: u32,
    ) -> Result<u32, Failure> {
        let (commits, sizes) = (commits.clone(), sizes.clone());
        gc.submit(&(), n, 1, move |(), group| async move {
            commits.fetch_add(1, Ordering::SeqCst);
            sizes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(group.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
            group.into_iter().map(|n| Ok(n * 2)).collect()
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writers_arriving_during_a_commit_share_the_next_one_and_get_their_own_answers() {
        let gc = Arc::new(Doubler::new("test-group-commit", 100, Tasks::new()));
        let commits = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let mut set = tokio::task::JoinSet::new();
        for n in 0..50u32 {
            let (gc, commits, sizes) = (gc.clone(), commits.clone(), sizes.clone());
            set.spawn(async move { (n, submit(&gc, &commits, &sizes, n).await) });
        }
        let mut answered = 0;
        while let Some(joined) = set.join_next().await {
            let (n, got) = joined.expect("writer task");
            assert_eq!(got, Ok(n * 2), "writer {n} got someone else's answer");
            answered += 1;
        }
        assert_eq!(answered, 50);
        let commits = commits.load(Ordering::SeqCst);
        assert!(
            commits < 10,
            "50 concurrent writers took {commits} commits; they were not grouped"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_never_exceeds_its_weight_and_a_lone_writer_commits_at_once() {
        let gc = Arc::new(Doubler::new("test-group-commit", 4, Tasks::new()));
        let commits = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let started = std::time::Instant::now();
        assert_eq!(submit(&gc, &commits, &sizes, 7).await, Ok(14));
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a lone writer waited for company"
        );
        let mut set = tokio::task::JoinSet::new();
        for n in 0..20u32 {
            let (gc, commits, sizes) = (gc.clone(), commits.clone(), sizes.clone());
            set.spawn(async move { submit(&gc, &commits, &sizes, n).await });
        }
        while let Some(joined) = set.join_next().await {
            assert!(joined.expect("writer task").is_ok());
        }
        let sizes = sizes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        assert_eq!(
            sizes.iter().sum::<usize>(),
            21,
            "every write committed exactly once: {sizes:?}"
        );
        assert!(sizes.iter().all(|&s| s <= 4), "a group went over its weight: {sizes:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_two_leads_every_writer_is_answered_once_and_in_its_own_words() {
        let gc = Arc::new(Doubler::new("test-group-commit", 3, Tasks::new()).with_leads(2));
        let commits = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        for round in 0..5u32 {
            let mut set = tokio::task::JoinSet::new();
            for n in 0..40u32 {
                let (gc, commits, sizes) = (gc.clone(), commits.clone(), sizes.clone());
                let n = round * 100 + n;
                set.spawn(async move { (n, submit(&gc, &commits, &sizes, n).await) });
            }
            while let Some(joined) = set.join_next().await {
                let (n, got) = joined.expect("writer task");
                assert_eq!(got, Ok(n * 2), "writer {n} was not answered with its own result");
            }
        }
        let sizes = sizes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        assert_eq!(
            sizes.iter().sum::<usize>(),
            200,
            "every write committed exactly once: {sizes:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_goes_away_mid_commit_still_answers_its_group() {
        let gc = Arc::new(Doubler::new("test-group-commit", 100, Tasks::new()));
        let (entered, mut in_commit) = tokio::sync::mpsc::channel::<()>(1);
        let release = Arc::new(tokio::sync::Notify::new());
        let mut leaders = tokio::task::JoinSet::new();
        let leader = {
            let (gc, release) = (gc.clone(), release.clone());
            leaders.spawn(async move {
                gc.submit(&(), 1, 1, move |(), group| async move {
                    let _ = entered.send(()).await;
                    release.notified().await;
                    group.into_iter().map(|n| Ok(n * 2)).collect::<Vec<_>>()
                })
                .await
            })
        };
        in_commit.recv().await.expect("the leader began its commit");
        // Queued behind the commit in flight; led by whoever is next.
        let mut followers = tokio::task::JoinSet::new();
        {
            let gc = gc.clone();
            followers.spawn(async move {
                gc.submit(&(), 5, 1, |(), group| async move {
                    group.into_iter().map(|n| Ok(n * 2)).collect::<Vec<_>>()
                })
                .await
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        release.notify_one();
        let got = tokio::time::timeout(Duration::from_secs(5), followers.join_next())
            .await
            .expect("the follower was answered")
            .expect("a follower")
            .expect("follower task");
        assert_eq!(got, Ok(10));
    }

    #[test]
    fn split_answers_hands_each_writer_its_own_part() {
        let parts = split_answers::<u32, String, String>(Ok(vec![1, 2, 3, 4, 5, 6]), &[1, 3, 2], Clone::clone);
        assert_eq!(parts, vec![Ok(vec![1]), Ok(vec![2, 3, 4]), Ok(vec![5, 6])]);
        let failed = split_answers::<u32, String, String>(Err("disk full".into()), &[2, 1], Clone::clone);
        assert_eq!(failed, vec![Err("disk full".to_owned()), Err("disk full".to_owned())]);
    }
}
