//! CPU cost of sealing and opening the replication link's records: AES-256-GCM from `ring`
//! (what `src/daemon/channel.rs` uses) over 1 MiB buffers, in seconds per GiB. `bench/floor`
//! runs it (`cargo run --release --example aes_gcm_speed`); nothing else depends on it.

use std::time::Instant;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

const MIB: usize = 1 << 20;
/// Each measurement runs this many MiB (2 GiB: a second or less per direction here).
const ROUNDS: u64 = 2048;

fn nonce(i: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0x5a; 32]).map_err(|_| "key")?);
    let mut buf = vec![0x11u8; MIB];
    let mut tags = Vec::with_capacity(ROUNDS as usize);
    let t = Instant::now();
    for i in 0..ROUNDS {
        let tag = key
            .seal_in_place_separate_tag(nonce(i), Aad::empty(), &mut buf)
            .map_err(|_| "seal")?;
        tags.push(tag);
    }
    let seal = t.elapsed().as_secs_f64() / (ROUNDS as f64 / 1024.0);
    // Open one sealed record over and over: the same work as opening ROUNDS records.
    let mut record = vec![0x22u8; MIB];
    let tag = key
        .seal_in_place_separate_tag(nonce(0), Aad::empty(), &mut record)
        .map_err(|_| "seal")?;
    record.extend_from_slice(tag.as_ref());
    let mut work = record.clone();
    let t = Instant::now();
    for _ in 0..ROUNDS {
        work.copy_from_slice(&record);
        key.open_in_place(nonce(0), Aad::empty(), &mut work)
            .map_err(|_| "open")?;
    }
    let open_and_copy = t.elapsed().as_secs_f64();
    // The copy that restores the record each round is not part of an open: take it out.
    let t = Instant::now();
    for _ in 0..ROUNDS {
        work.copy_from_slice(&record);
        std::hint::black_box(&mut work);
    }
    let copy = t.elapsed().as_secs_f64();
    let open = (open_and_copy - copy).max(0.0) / (ROUNDS as f64 / 1024.0);
    std::hint::black_box(&tags);
    println!("seal_s_per_gib={seal:.4}");
    println!("open_s_per_gib={open:.4}");
    Ok(())
}
