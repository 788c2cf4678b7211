//! The comparison (`rwkv_tune::tune::compare`) at a tiny budget: all four
//! rows with finite numbers, and the observer's soft targets.
use rwkv_tune::model::weights::Config;
use rwkv_tune::model::Weights;
use rwkv_tune::tune::compare::{run_comparison, CompareConfig, Method};
use rwkv_tune::tune::grad::{loss_and_grad, Example, GradOpts, TunedState};
use rwkv_tune::tune::observer::fill_soft_targets;
use rwkv_tune::tune::optim::Schedule;

#[test]
fn tiny_comparison_has_four_finite_rows() {
    let mut cc = CompareConfig::new(4);
    cc.batch = 2;
    cc.n_train = 12;
    cc.n_valid = 6;
    cc.eval_every = 2;
    cc.observer_steps = 2;
    cc.observer_layers = 3;
    cc.upscale_m = 72;
    cc.schedule = Schedule {
        warmup: 1,
        ..Schedule::rwkv_peft(4)
    };
    let mut lines = Vec::new();
    let res = run_comparison(&cc, &mut |l| lines.push(l.to_string())).unwrap();
    let names: Vec<Method> = res.rows.iter().map(|r| r.method).collect();
    assert_eq!(names, Method::ALL.to_vec());
    assert!(res.base_loss.is_finite() && res.target.is_finite());
    for r in &res.rows {
        assert!(r.final_loss.is_finite(), "{r:?}");
        assert!(r.train_loss.is_finite(), "{r:?}");
        assert!(r.params > 0);
        let acc = r.accuracy.expect("the task has answers");
        assert!((0.0..=1.0).contains(&acc));
        assert_eq!(r.curve.first().map(|c| c.0), Some(0));
        assert_eq!(r.curve.last().map(|c| c.0), Some(4));
        assert!(r.curve.iter().all(|c| c.1.is_finite()));
        // tuning must move the held-out loss away from the untuned model
        assert!(r.final_loss < res.base_loss, "{r:?} base {}", res.base_loss);
    }
    // the plain row defines the target and reaches it at its last step
    assert_eq!(res.rows[0].steps_to_target, Some(4));
    let upscaled = &res.rows[2];
    assert!(upscaled.params > res.rows[0].params);
    let md = res.to_markdown("cmd", "test machine", "today");
    for m in Method::ALL {
        assert!(md.contains(&format!("| {} |", m.name())), "{md}");
    }
    assert!(!md.contains("NaN") && !md.contains("inf"), "{md}");
    assert_eq!(lines.len(), 6, "{lines:?}");
    // bad settings are typed errors
    let mut bad = cc.clone();
    bad.steps = 0;
    assert!(matches!(
        run_comparison(&bad, &mut |_| {}),
        Err(rwkv_tune::Error::Tune(_))
    ));
}

#[test]
fn observer_soft_targets_are_distributions_and_a_self_teacher_adds_nothing() {
    let cfg = Config::with_defaults(2, 64, 32, 30);
    let w = Weights::random(&cfg, 4).unwrap();
    let ex = Example {
        tokens: vec![1, 5, 7, 2, 9],
        targets: vec![5, 7, 2, 9, 3],
        mask: vec![0.0, 1.0, 1.0, 1.0, 1.0],
        soft: None,
    };
    let mut batch = vec![ex.clone(), ex];
    fill_soft_targets(&w, None, &mut batch, 1.0).unwrap();
    let p = batch[0].soft.as_ref().unwrap();
    assert_eq!(p.len(), 5 * 30);
    for row in p.chunks(30) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    // teacher = student (zero state): the KL term and its gradient vanish
    let s = TunedState::zeros(&cfg, false);
    let a = loss_and_grad(&w, &s, &batch, &GradOpts::default()).unwrap();
    let o = GradOpts {
        observer_weight: 2.0,
        ..GradOpts::default()
    };
    let b = loss_and_grad(&w, &s, &batch, &o).unwrap();
    assert!(
        (a.loss - b.loss).abs() < 1e-3 * a.loss,
        "{} {}",
        a.loss,
        b.loss
    );
    for (x, y) in a.grad.params().iter().zip(b.grad.params()) {
        for (u, v) in x.iter().zip(y) {
            assert!((u - v).abs() < 1e-4 * (1.0 + u.abs()), "{u} {v}");
        }
    }
    assert!(fill_soft_targets(&w, None, &mut batch, 0.0).is_err());
}
