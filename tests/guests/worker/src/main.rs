//! worker: CPU-bound work with progress, for the several-VMs-on-several-cores tests and the
//! benchmark. The command line gives `work=M` (rounds, default 100) and optionally `name=TEXT`.
//! Each round runs `STEPS_PER_ROUND` steps of an affine recurrence with a running sum,
//!     x <- A*x + C,  sum <- sum + x   (all mod 2^64),
//! which is pure register arithmetic: no exits. Every 10 % it prints `worker: progress N/M`, then
//! the result, which it checks against the same value computed a second, different way: the
//! step is linear in (x, sum, 1), so M * STEPS_PER_ROUND steps are one 3x3 matrix raised to that
//! power (square and multiply, about 70 matrix products). It prints the TSC at the start and the
//! end of the work (the benchmark's figures), `worker: done`, and exits with status 0.
#![no_std]
#![no_main]

use core::hint::black_box;
use guest_lib::boot_info::parameter;
use guest_lib::{exit, hw, println, BootInfo};

guest_lib::flat64_entry!(main);

/// Rounds when the command line has no `work=`.
const DEFAULT_WORK: u64 = 100;
/// Steps per round: about 30 ms of QEMU TCG time (tests/guests/README.md).
const STEPS_PER_ROUND: u64 = 12 << 20;
/// Knuth's MMIX LCG constants: A odd, C odd.
const A: u64 = 6_364_136_223_846_793_005;
const C: u64 = 1_442_695_040_888_963_407;
const SEED: u64 = 0x5249_4E47_5A45_524F;

/// (x, sum) after `steps` more steps, one at a time: the work.
fn run_steps(mut x: u64, mut sum: u64, steps: u64) -> (u64, u64) {
    for _ in 0..steps {
        x = x.wrapping_mul(A).wrapping_add(C);
        sum = sum.wrapping_add(x);
    }
    (x, sum)
}

type Matrix = [[u64; 3]; 3];

fn multiply(left: &Matrix, right: &Matrix) -> Matrix {
    let mut product = [[0u64; 3]; 3];
    for (row, product_row) in product.iter_mut().enumerate() {
        for (column, cell) in product_row.iter_mut().enumerate() {
            *cell = (0..3).fold(0u64, |total, k| {
                total.wrapping_add(left[row][k].wrapping_mul(right[k][column]))
            });
        }
    }
    product
}

/// (x, sum) after `steps` steps from (x, sum), the other way: the step as a matrix on
/// (x, sum, 1), x' = A x + C, sum' = sum + A x + C, raised to the power `steps`.
fn jump_ahead(x: u64, sum: u64, mut steps: u64) -> (u64, u64) {
    let mut power: Matrix = [[A, 0, C], [A, 1, C], [0, 0, 1]];
    let mut result: Matrix = [[1, 0, 0], [0, 1, 0], [0, 0, 1]];
    while steps != 0 {
        if steps & 1 != 0 {
            result = multiply(&result, &power);
        }
        power = multiply(&power, &power);
        steps >>= 1;
    }
    let apply = |row: [u64; 3]| {
        row[0]
            .wrapping_mul(x)
            .wrapping_add(row[1].wrapping_mul(sum))
            .wrapping_add(row[2])
    };
    (apply(result[0]), apply(result[1]))
}

/// The printed result: both halves of the state folded into one word.
fn fold(x: u64, sum: u64) -> u64 {
    x ^ sum.rotate_left(32)
}

fn main(boot_info: BootInfo) -> ! {
    let cmdline = core::str::from_utf8(boot_info.cmdline()).unwrap_or("");
    let name = parameter(cmdline, "name").unwrap_or("worker");
    let work = match parameter(cmdline, "work") {
        None => DEFAULT_WORK,
        Some(text) => match text.parse::<u64>() {
            Ok(rounds) if rounds > 0 => rounds,
            _ => {
                println!("worker: FAILED bad work={text} (want a positive number of rounds)");
                exit(1);
            }
        },
    };
    println!(
        "worker: {name} starting work={work} rounds of {STEPS_PER_ROUND} steps (memory={:#x})",
        boot_info.memory_size
    );
    let (mut x, mut sum) = (SEED, 0u64);
    let start = hw::rdtsc();
    for round in 1..=work {
        (x, sum) = run_steps(black_box(x), black_box(sum), STEPS_PER_ROUND);
        // Progress at every 10 % boundary (every round when there are fewer than 10).
        if round * 10 / work != (round - 1) * 10 / work {
            println!("worker: progress {round}/{work}");
        }
    }
    let end = hw::rdtsc();
    let result = fold(x, sum);
    println!("worker: result {result:#x}");
    let (check_x, check_sum) = jump_ahead(SEED, 0, work * STEPS_PER_ROUND);
    let expected = fold(check_x, check_sum);
    if expected != result {
        println!("worker: FAILED result {result:#x} but the matrix jump-ahead gives {expected:#x}");
        exit(1);
    }
    println!("worker: result checked (matrix jump-ahead agrees)");
    println!("worker: tsc start={start} end={end}");
    println!("worker: done");
    exit(0);
}
