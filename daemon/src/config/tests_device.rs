//! `engine.device`: the forms it takes from each layer and the errors for the others.

use std::fs;

use super::tests::{env, load_err, Files};
use super::*;

#[test]
fn device_names_a_gpu_by_ordinal_and_refuses_other_names() {
    let files = Files::new(Some("[engine]\ndevice = \"cuda:0\"\n"));
    let mut opts = files.opts();
    let c = Config::load(&opts).unwrap();
    assert_eq!(c.engine.device, Device(DeviceChoice::Cuda(Some(0))));
    opts.env = env(&[("TILEFLOW_ENGINE__DEVICE", "cuda:3")]);
    let loaded = Config::load_detailed(&opts).unwrap();
    assert_eq!(loaded.config.engine.device.to_string(), "cuda:3");
    let opts = opts.with_flag("engine.device", "cuda", "--device");
    let loaded = Config::load_detailed(&opts).unwrap();
    assert_eq!(
        loaded.config.engine.device,
        Device(DeviceChoice::Cuda(None))
    );
    assert_eq!(loaded.origin("engine.device"), &Origin::Flag("--device"));
    // `config check` prints what was written, not a normalised `cuda:0`.
    let text = loaded.config.to_annotated_toml("", |_| None);
    assert!(text.contains("device = \"cuda\"\n"), "{text}");

    for (var, value) in [
        ("TILEFLOW_ENGINE__DEVICE", "gpu"),
        ("TILEFLOW_ENGINE__DEVICE", "cuda:one"),
    ] {
        let opts = ConfigSources {
            env: env(&[(var, value)]),
            ..files.opts()
        };
        let err = load_err(&opts);
        let want = format!("environment variable {var}: engine.device: {value:?} is not a device");
        assert!(err.starts_with(&want), "{err}");
        assert!(err.contains("\"cuda:N\""), "{err}");
    }
    fs::write(files.path(), "[engine]\ndevice = 1\n").unwrap();
    let err = load_err(&files.opts());
    assert!(
        err.contains("tileflowd.toml:2: engine.device: invalid type"),
        "{err}"
    );
}
