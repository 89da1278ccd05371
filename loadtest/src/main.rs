//! pushgate-loadtest: opens many device WebSockets against a pushgate
//! gateway (over worker processes and source addresses), drives a scenario
//! through the backend API, and measures connections, deliveries, latency,
//! loss and the gateway's memory and CPU. It speaks the wire protocol of
//! PROTOCOL.md only; it does not link the gateway.

mod api;
mod bench;
mod cli;
mod device;
mod floor;
mod net;
mod plot;
mod procstat;
mod results;
mod run;
mod target;
mod token;
mod wire;
mod worker;

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{Cli, Command, LoadOpts};
use crate::results::Results;

/// Exit code when the run worked but found failures, loss or duplicates.
const EXIT_PROBLEMS: u8 = 3;

/// Unix time in microseconds (the clock payload timestamps use).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Unix time in seconds.
pub fn unix_secs() -> u64 {
    now_us() / 1_000_000
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Worker => return exit(worker::main().map(|()| ExitCode::SUCCESS)),
        Command::Floor(o) => return exit(floor::main(o).map(|()| ExitCode::SUCCESS)),
        Command::FloorSink(o) => return exit(floor::sink_main(o).map(|()| ExitCode::SUCCESS)),
        Command::Run { scenario, load } => coordinator(load.clone(), async move {
            let plan = run::Plan::new(scenario, load, run::Restart::No).await?;
            run::execute(plan, None).await
        }),
        Command::Bench {
            scenario,
            bench,
            load,
        } => coordinator(load.clone(), bench::bench(scenario, bench, load)),
    };
    exit(outcome)
}

fn exit(r: Result<ExitCode>) -> ExitCode {
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pushgate-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the coordinator's future, then prints and writes the results.
fn coordinator(
    load: LoadOpts,
    fut: impl std::future::Future<Output = Result<Results>>,
) -> Result<ExitCode> {
    // One thread: the coordinator only sends API calls and reads worker
    // events; the connections live in the workers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let res = rt.block_on(fut)?;
    print!("{}", res.summary());
    if let Some(path) = &load.json {
        let text = serde_json::to_string_pretty(&res)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &load.plot {
        if let Err(e) = plot::draw(path, &res) {
            eprintln!("pushgate-loadtest: --plot {}: {e:#}", path.display());
        }
    }
    Ok(if res.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROBLEMS)
    })
}
