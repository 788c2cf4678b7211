//! Criterion benches of the WKV-7 op on every backend: CPU reference and
//! emulated kernels always (small shapes), CUDA kernels when a GPU is present
//! (timed with CUDA events through `iter_custom`, buffers allocated outside
//! the timed region). `cargo test --benches` runs each once as a smoke test.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rwkv_tune::bench::{time_wkv7, Pass};
use rwkv_tune::wkv7::{Backend, Dims, Version};
use std::time::Duration;

fn bench_backend(c: &mut Criterion, group: &str, backend: &Backend, shapes: &[Dims]) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    for d in shapes {
        g.throughput(Throughput::Elements((d.b * d.t * d.h) as u64)); // token·heads
        for pass in [Pass::Forward, Pass::ForwardBackward] {
            let id = BenchmarkId::new(
                pass.name(),
                format!("B{}_T{}_H{}_N{}_bf16", d.b, d.t, d.h, d.n),
            );
            g.bench_function(id, |bch| {
                bch.iter_custom(|iters| {
                    let ms =
                        time_wkv7::<half::bf16>(backend, Version::V1, d, pass, 0, iters as usize)
                            .expect("wkv7 run");
                    Duration::from_secs_f64(ms.iter().sum::<f64>() / 1e3)
                })
            });
        }
    }
    g.finish();
}

fn wkv7(c: &mut Criterion) {
    bench_backend(
        c,
        "wkv7_cpu",
        &Backend::Cpu,
        &[Dims {
            b: 1,
            t: 256,
            h: 2,
            n: 64,
        }],
    );
    bench_backend(
        c,
        "wkv7_emu",
        &Backend::Emu,
        &[Dims {
            b: 1,
            t: 16,
            h: 1,
            n: 64,
        }],
    );
    match Backend::from_name("cuda") {
        Ok(gpu) => bench_backend(
            c,
            "wkv7_cuda",
            &gpu,
            &[
                Dims {
                    b: 8,
                    t: 4096,
                    h: 64,
                    n: 64,
                },
                Dims {
                    b: 8,
                    t: 4096,
                    h: 12,
                    n: 64,
                },
            ],
        ),
        Err(e) => eprintln!("wkv7_cuda benches skipped: {e}"),
    }
}

criterion_group!(benches, wkv7);
criterion_main!(benches);
