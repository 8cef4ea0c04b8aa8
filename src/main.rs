use clap::Parser;

fn main() {
    sglp_engine::cli::restore_sigpipe();
    // Before any work, so that an interrupt at any later moment removes the staging files of unfinished
    // outputs.
    if let Err(e) = sglp_engine::cli::install_interrupt_handler() {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let result = sglp_engine::cli::check_renamed_flags(&args)
        .and_then(|()| sglp_engine::cli::run(sglp_engine::cli::Cli::parse_from(args)));
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}
