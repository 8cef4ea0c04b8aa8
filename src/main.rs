use clap::Parser;

fn main() {
    let cli = sglp_engine::cli::Cli::parse();
    if let Err(e) = sglp_engine::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}
