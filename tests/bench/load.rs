//! The load loops: closed-loop (N workers, each sending its next operation
//! when the previous one answers) and open-loop (operations sent at a fixed
//! arrival rate whatever the answers do, each timed from its scheduled send
//! time so a stalled server is not hidden by coordinated omission).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use hdrhistogram::Histogram;
use tokio::time::Instant;

/// What one operation answers: `Some(latency)` when it timed a part of
/// itself (the step-up scenario times approve → notified only), `None` to
/// be timed as a whole.
pub type Outcome = Result<Option<Duration>>;

/// One operation: its argument is a sequence number unique within the run
/// (for round-robin pools, fresh idempotency keys and digests).
pub type Op = Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync>;

/// Wraps an async closure as an [`Op`].
pub fn op<F, Fut>(f: F) -> Op
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    Arc::new(move |seq| Box::pin(f(seq)))
}

/// How load is offered.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// `concurrency` workers back to back.
    Closed { concurrency: usize },
    /// `rate` operations per second.
    Open { rate: f64 },
}

/// What one measured run saw.
pub struct Measured {
    /// Microseconds, successful operations only.
    pub histogram: Histogram<u64>,
    pub ops: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// The first error's text, to say what went wrong.
    pub first_error: Option<String>,
}

impl Measured {
    pub fn new() -> Result<Self> {
        Ok(Self {
            // 1 µs .. 100 s, 3 significant digits.
            histogram: Histogram::new_with_bounds(1, 100_000_000, 3)?,
            ops: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            first_error: None,
        })
    }

    pub fn record(&mut self, latency: Duration, outcome: Outcome) -> Result<()> {
        match outcome {
            Ok(timed) => {
                let latency = timed.unwrap_or(latency);
                let micros = u64::try_from(latency.as_micros())?.max(1);
                self.histogram.saturating_record(micros);
                self.ops += 1;
            }
            Err(err) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{err:#}"));
                }
            }
        }
        Ok(())
    }

    pub fn merge(&mut self, other: Self) -> Result<()> {
        self.histogram.add(other.histogram)?;
        self.ops += other.ops;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }

    /// The `quantile` latency in milliseconds.
    pub fn millis(&self, quantile: f64) -> f64 {
        self.histogram.value_at_quantile(quantile) as f64 / 1000.0
    }

    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Offers `op` in `mode` for `duration`; `seq` numbers the operations
/// across runs (warm-up, then measurement) so none repeats an argument.
pub async fn run(
    op: &Op,
    mode: Mode,
    duration: Duration,
    seq: &Arc<AtomicU64>,
) -> Result<Measured> {
    match mode {
        Mode::Closed { concurrency } => closed_loop(op, concurrency, duration, seq).await,
        Mode::Open { rate } => open_loop(op, rate, duration, seq).await,
    }
}

async fn closed_loop(
    op: &Op,
    concurrency: usize,
    duration: Duration,
    seq: &Arc<AtomicU64>,
) -> Result<Measured> {
    let started = Instant::now();
    let end = started + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let (op, seq) = (op.clone(), seq.clone());
        workers.push(tokio::spawn(async move {
            let mut measured = Measured::new()?;
            while Instant::now() < end {
                let sent = Instant::now();
                let outcome = op(seq.fetch_add(1, Ordering::Relaxed)).await;
                measured.record(sent.elapsed(), outcome)?;
            }
            anyhow::Ok(measured)
        }));
    }
    let mut total = Measured::new()?;
    for worker in workers {
        total.merge(worker.await??)?;
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

async fn open_loop(
    op: &Op,
    rate: f64,
    duration: Duration,
    seq: &Arc<AtomicU64>,
) -> Result<Measured> {
    anyhow::ensure!(rate > 0.0, "--rate must be positive");
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Duration, Outcome)>();
    let started = Instant::now();
    let collector = tokio::spawn(async move {
        let mut measured = Measured::new()?;
        while let Some((latency, outcome)) = rx.recv().await {
            measured.record(latency, outcome)?;
        }
        anyhow::Ok(measured)
    });
    // The arrival times come from a thread of their own: tokio's timer
    // has a resolution of 1 ms, so its sleeps sent the operations of each
    // millisecond together, up to 1 ms late, and that lateness was counted
    // in every latency (which runs from the scheduled time). A thread's
    // sleep wakes within tens of microseconds.
    let (ticks, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let (first, end) = (started.into_std(), (started + duration).into_std());
    let pacer = std::thread::spawn(move || {
        let mut sent: u32 = 0;
        loop {
            let scheduled = first + interval * sent;
            if scheduled >= end {
                return;
            }
            let now = std::time::Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            if ticks.send(Instant::from_std(scheduled)).is_err() {
                return;
            }
            sent += 1;
        }
    });
    while let Some(scheduled) = arrivals.recv().await {
        let (op, tx) = (op.clone(), tx.clone());
        let n = seq.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let outcome = op(n).await;
            // Timed from when it should have been sent, not when it was.
            let _ = tx.send((scheduled.elapsed(), outcome));
        });
    }
    pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the open loop's pacer panicked"))?;
    drop(tx);
    let mut measured = collector.await??;
    measured.elapsed = started.elapsed();
    Ok(measured)
}
