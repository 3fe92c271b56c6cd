use super::*;

fn sampler(params: SamplingParams) -> Sampler {
    Sampler::new(params).unwrap()
}

fn seeded(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
    sampler(SamplingParams {
        temperature,
        top_k,
        top_p,
        seed: Some(seed),
        ..SamplingParams::default()
    })
}

/// Counts how often each id is drawn in `n` samples.
fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
    let mut counts = vec![0; logits.len()];
    for _ in 0..n {
        counts[s.sample(logits).unwrap().id as usize] += 1;
    }
    counts
}

/// ln of probabilities [0.5, 0.3, 0.15, 0.05].
fn four_way() -> Vec<f32> {
    [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect()
}

#[test]
fn validate_names_the_bad_field() {
    let field_of = |p: SamplingParams| match p.validate() {
        Err(SamplerError::InvalidParam { field, .. }) => field,
        other => panic!("expected an invalid parameter, got {other:?}"),
    };
    let base = SamplingParams::default();
    assert!(base.validate().is_ok());
    let cases = [
        (
            SamplingParams {
                temperature: -1.0,
                ..base.clone()
            },
            "temperature",
        ),
        (
            SamplingParams {
                temperature: f32::NAN,
                ..base.clone()
            },
            "temperature",
        ),
        (
            SamplingParams {
                top_p: 0.0,
                ..base.clone()
            },
            "top_p",
        ),
        (
            SamplingParams {
                top_p: 1.5,
                ..base.clone()
            },
            "top_p",
        ),
        (
            SamplingParams {
                max_tokens: 0,
                ..base.clone()
            },
            "max_tokens",
        ),
        (
            SamplingParams {
                logprobs: Some(21),
                ..base.clone()
            },
            "logprobs",
        ),
        (
            SamplingParams {
                stop: vec!["a".into(), String::new()],
                ..base.clone()
            },
            "stop[1]",
        ),
    ];
    for (params, field) in cases {
        assert_eq!(field_of(params.clone()), field);
        assert!(Sampler::new(params).is_err());
    }
    let msg = SamplingParams { top_p: 2.0, ..base }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("top_p"), "{msg}");
    assert!(SamplingParams {
        logprobs: Some(20),
        ..SamplingParams::default()
    }
    .validate()
    .is_ok());
}

#[test]
fn params_deserialize_with_defaults_and_reject_unknown_fields() {
    let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0, "seed": 5}"#).unwrap();
    assert_eq!(
        p,
        SamplingParams {
            temperature: 0.0,
            seed: Some(5),
            ..SamplingParams::default()
        }
    );
    assert!(serde_json::from_str::<SamplingParams>(r#"{"temprature": 0}"#).is_err());
}

#[test]
fn greedy_is_argmax_with_ties_to_lowest_id_and_raw_logprobs() {
    let logits = [1.5, -0.25, 3.0, 3.0, 0.0, -7.5];
    let mut s = sampler(SamplingParams {
        logprobs: Some(3),
        ..SamplingParams::greedy(10)
    });
    let t = s.sample(&logits).unwrap();
    assert_eq!(t.id, 2);
    // Python: x - (m + log(fsum(exp(v - m)))) for the same logits.
    assert!((t.logprob - -0.837_991_4).abs() < 1e-6, "{}", t.logprob);
    let ids: Vec<u32> = t.top_logprobs.iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, [2, 3, 0]);
    assert!((t.top_logprobs[2].1 - -2.337_991_4).abs() < 1e-6);
    // Greedy does not depend on the random stream.
    assert_eq!(
        sampler(SamplingParams::greedy(1))
            .sample(&logits)
            .unwrap()
            .id,
        2
    );
}

#[test]
fn logprobs_zero_or_none_report_no_alternatives() {
    let logits = [0.0, 1.0];
    for logprobs in [None, Some(0)] {
        let mut s = sampler(SamplingParams {
            logprobs,
            ..SamplingParams::greedy(1)
        });
        let t = s.sample(&logits).unwrap();
        assert!(t.top_logprobs.is_empty());
        assert!((t.logprob - -0.313_261_7).abs() < 1e-6);
    }
    let mut s = sampler(SamplingParams {
        logprobs: Some(20),
        ..SamplingParams::greedy(1)
    });
    assert_eq!(s.sample(&logits).unwrap().top_logprobs.len(), 2);
}

#[test]
fn logprobs_are_stable_for_large_logits() {
    let logits = [1.0e4, 1.0e4 - 1.0, -1.0e4];
    let t = sampler(SamplingParams::greedy(1)).sample(&logits).unwrap();
    // log(1 / (1 + e^-1)) = -0.31326169
    assert!((t.logprob - -0.313_261_7).abs() < 1e-5, "{}", t.logprob);
}

#[test]
fn bad_logits_are_errors_not_panics() {
    let mut s = seeded(1.0, 0, 1.0, 1);
    assert_eq!(s.sample(&[]), Err(SamplerError::EmptyLogits));
    assert!(matches!(
        s.sample(&[0.0, f32::NAN]),
        Err(SamplerError::NonFiniteLogit { id: 1, .. })
    ));
    assert!(matches!(
        s.sample(&[f32::INFINITY]),
        Err(SamplerError::NonFiniteLogit { id: 0, .. })
    ));
    assert_eq!(
        s.sample(&[f32::NEG_INFINITY; 3]),
        Err(SamplerError::AllMasked { vocab: 3 })
    );
}

#[test]
fn masked_tokens_are_never_drawn() {
    let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
    let counts = histogram(&mut seeded(1.0, 0, 1.0, 3), &logits, 2000);
    assert_eq!((counts[0], counts[2]), (0, 0));
    assert!(counts[1] > 800 && counts[3] > 800, "{counts:?}");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let logits: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32) / 25.0).collect();
    let draw = |seed| {
        let mut s = seeded(0.8, 50, 0.9, seed);
        (0..64)
            .map(|_| s.sample(&logits).unwrap().id)
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
}

#[test]
fn temperature_one_follows_the_softmax() {
    let counts = histogram(&mut seeded(1.0, 0, 1.0, 7), &four_way(), 20_000);
    for (count, p) in counts.iter().zip([0.5, 0.3, 0.15, 0.05]) {
        let freq = *count as f64 / 20_000.0;
        assert!((freq - p).abs() < 0.015, "{counts:?}");
    }
}

#[test]
fn top_k_keeps_the_k_most_likely() {
    let counts = histogram(&mut seeded(1.0, 2, 1.0, 11), &four_way(), 8000);
    assert_eq!((counts[2], counts[3]), (0, 0));
    let ratio = counts[0] as f64 / counts[1] as f64;
    assert!((ratio - 5.0 / 3.0).abs() < 0.15, "{counts:?}");
    // top_k = 1 is greedy; top_k larger than the vocabulary is off.
    assert_eq!(
        histogram(&mut seeded(1.0, 1, 1.0, 1), &four_way(), 200)[0],
        200
    );
    assert!(histogram(&mut seeded(1.0, 10, 1.0, 1), &four_way(), 2000)[3] > 0);
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let counts = histogram(&mut seeded(1.0, 0, 0.75, 5), &four_way(), 8000);
    assert_eq!((counts[2], counts[3]), (0, 0), "0.5 + 0.3 reaches 0.75");
    let counts = histogram(&mut seeded(1.0, 0, 0.85, 5), &four_way(), 8000);
    assert_eq!(counts[3], 0);
    assert!(counts[2] > 0);
    // The most likely token is always kept.
    assert_eq!(
        histogram(&mut seeded(1.0, 0, 0.01, 5), &four_way(), 100)[0],
        100
    );
}

#[test]
fn temperature_applies_before_top_p() {
    // At T = 0.5 the probabilities become ∝ p² = [0.685, 0.247, 0.062, 0.007], so top_p = 0.6
    // keeps token 0 alone; filtering before the temperature would have kept two.
    assert_eq!(
        histogram(&mut seeded(0.5, 0, 0.6, 9), &four_way(), 500)[0],
        500
    );
    // And high temperature flattens: token 3 becomes common.
    let counts = histogram(&mut seeded(4.0, 0, 1.0, 9), &four_way(), 4000);
    assert!(counts[3] > 600, "{counts:?}");
}

#[test]
fn top_logprobs_break_ties_by_lower_id() {
    let logits = [0.0, 2.0, 1.0, 2.0, 1.0, 2.0];
    let mut s = sampler(SamplingParams {
        logprobs: Some(4),
        ..SamplingParams::greedy(1)
    });
    let ids: Vec<u32> = s
        .sample(&logits)
        .unwrap()
        .top_logprobs
        .iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(ids, [1, 3, 5, 2]);
    assert_eq!(top_n(&logits, 0), Vec::<u32>::new());
    assert_eq!(top_n(&logits, 10), [1, 3, 5, 2, 4, 0]);
}

#[test]
fn large_top_k_and_top_n_agree_with_a_full_sort() {
    let logits: Vec<f32> = (0..5000u32)
        .map(|i| ((i * 7919 % 613) as f32) / 61.0)
        .collect();
    let mut sorted: Vec<u32> = (0..5000).collect();
    sorted.sort_by(|&a, &b| by_logit_desc(&logits, a, b));
    for n in [1, 64, 65, 300, 4999, 5000, 6000] {
        assert_eq!(top_n(&logits, n), sorted[..n.min(5000)], "n = {n}");
    }
}

#[test]
fn top_p_over_a_flat_vocabulary_keeps_the_right_share() {
    // 10 000 equally likely tokens except a few masked: top_p = 0.5 keeps the 4 999 or 5 000
    // lowest ids (ties go to lower ids), however far the cutoff search has to go.
    let mut logits = vec![0.0f32; 10_000];
    logits[3] = f32::NEG_INFINITY;
    let mut s = seeded(1.0, 0, 0.5, 21);
    let max = (0..2000)
        .map(|_| s.sample(&logits).unwrap().id)
        .max()
        .unwrap();
    assert!((4900..=5001).contains(&max), "{max}");
    // A peaked distribution with a long tail: top_p = 0.999 must reach into the tail.
    let mut logits = vec![-12.0f32; 50_000];
    logits[0] = 0.0;
    let mut s = seeded(1.0, 0, 0.999, 22);
    assert!((0..500).any(|_| s.sample(&logits).unwrap().id != 0));
}

#[test]
fn a_large_vocabulary_scans_in_parallel_with_the_serial_answer() {
    // 150k logits (the parallel path): the maximum twice, in two chunks, and masked tokens.
    let n = 150_000;
    let mut logits: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 250.0).collect();
    logits[40_000] = 9.0;
    logits[140_000] = 9.0;
    logits[5] = f32::NEG_INFINITY;
    let t = sampler(SamplingParams::greedy(1)).sample(&logits).unwrap();
    assert_eq!(t.id, 40_000, "ties go to the lower id across chunks");
    let max = 9.0f32;
    let sum: f64 = logits.iter().map(|&x| f64::from((x - max).exp())).sum();
    let want = (0.0 - sum.ln()) as f32;
    assert!((t.logprob - want).abs() < 1e-6, "{} vs {want}", t.logprob);
    // The first non-finite logit is named, whichever chunk it is in.
    logits[120_000] = f32::NAN;
    logits[90_000] = f32::INFINITY;
    let err = sampler(SamplingParams::greedy(1))
        .sample(&logits)
        .unwrap_err()
        .to_string();
    assert!(err.contains("90000"), "{err}");
}

#[test]
fn the_vectorised_exp_is_within_a_ten_millionth() {
    let mut worst = 0f64;
    for i in 0..=870_000 {
        let x = -(i as f32) * 1e-4;
        let want = f64::from(x).exp();
        let got = f64::from(super::exp_nonpositive(x));
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 2e-7, "worst relative error {worst:e}");
    assert_eq!(super::exp_nonpositive(0.0), 1.0);
}

#[test]
fn a_small_vocabulary_scans_with_the_plain_answer() {
    // OLMoE's vocabulary (the serial path), masked tokens and a tail far below the maximum.
    let n = 50_304;
    let mut logits: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 10.0 - 60.0)
        .collect();
    logits[7] = f32::NEG_INFINITY;
    logits[50_000] = 41.0;
    logits[20_000] = 41.0;
    let t = sampler(SamplingParams::greedy(1)).sample(&logits).unwrap();
    assert_eq!(t.id, 20_000);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - 41.0).exp()).sum();
    let want = -sum.ln();
    assert!(
        (f64::from(t.logprob) - want).abs() < 1e-6,
        "{} vs {want}",
        t.logprob
    );
}

#[test]
fn a_summary_from_the_backend_stands_in_for_the_scan() {
    let logits: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let summary = LogitSummary::scan(&logits).unwrap();
    let plain = sampler(SamplingParams::greedy(1)).sample(&logits).unwrap();
    let given = sampler(SamplingParams::greedy(1))
        .sample_with(&logits, Some(&summary))
        .unwrap();
    assert_eq!(plain, given);
    let drawn = |s: Option<&LogitSummary>| {
        let mut s0 = seeded(0.8, 50, 0.9, 5);
        (0..20)
            .map(|_| s0.sample_with(&logits, s).unwrap().id)
            .collect::<Vec<_>>()
    };
    assert_eq!(drawn(None), drawn(Some(&summary)));
    // A summary that cannot be this row's (argmax past the end) is ignored.
    let wrong = LogitSummary {
        argmax: 5000,
        ..summary
    };
    let t = sampler(SamplingParams::greedy(1))
        .sample_with(&logits, Some(&wrong))
        .unwrap();
    assert_eq!(t, plain);
}
