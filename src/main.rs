//! tandem: highly available storage for a pair of machines.
mod daemon;

fn main() {
    println!("tandem");
}
