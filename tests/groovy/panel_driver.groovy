/*
 * Test support (not QuPath): drives the window simsearch_panel.groovy opened, as a user would,
 * in the same JVM (run it after the panel with the launcher's --fx). Writes what it saw to the
 * JSON file -Dpanel.report=..., and a snapshot of the window to -Dpanel.snapshot=... (PNG).
 *
 * Steps: wait for the window and the server check; Suggest; per class note the sliders and the
 * shown candidates; move the first class's slider to 1, to its floor, to the 3rd candidate's
 * similarity; reject the best candidate and move the slider to 1 again; show the heat map;
 * snapshot; Review; Background. With -Dpanel.steps=jobs: Train, then Predict.
 */
import javafx.application.Platform
import javafx.embed.swing.SwingFXUtils
import javafx.scene.Node
import javafx.scene.control.Button
import javafx.scene.control.CheckBox
import javafx.scene.control.Label
import javafx.scene.control.Slider
import javafx.stage.Stage
import javafx.stage.Window
import qupath.lib.objects.PathObject
import qupath.lib.objects.classes.PathClass

import javax.imageio.ImageIO
import java.util.concurrent.CountDownLatch

Object fx(Closure work) {
    Object[] out = new Object[1]
    Throwable[] error = new Throwable[1]
    CountDownLatch done = new CountDownLatch(1)
    Platform.runLater({
        try { out[0] = work.call() } catch (Throwable t) { error[0] = t } finally { done.countDown() }
    } as Runnable)
    done.await()
    if (error[0] != null)
        throw error[0]
    return out[0]
}

Object waitFor(String what, int seconds, Closure condition) {
    long end = System.currentTimeMillis() + seconds * 1000L
    while (System.currentTimeMillis() < end) {
        Object value = fx(condition)
        if (value)
            return value
        Thread.sleep(100)
    }
    throw new IllegalStateException('timed out waiting for ' + what)
}

Stage stage = (Stage) waitFor('the panel', 30) { Window.getWindows().find { it instanceof Stage && ((Stage) it).getTitle() == 'SimSearch' } }
Closure<Node> node = { String id -> stage.getScene().lookup('#' + id) }
Closure<String> text = { String id -> (String) fx { ((Label) node(id)).getText() } }
Map report = [steps: []]

String server = (String) waitFor('the server check', 30) { String t = ((Label) node('server-status')).getText(); t.contains('checking') ? null : t }
report.server = server

Closure<String> click = { String id ->
    fx { ((Button) node(id)).fire() }
    String name = (String) fx { ((Button) node(id)).getText() }
    return (String) waitFor(id, 240) {
        String t = ((Label) node('job-status')).getText()
        (t.startsWith(name + ': ') && !t.contains('working')) || t.startsWith(name + ' failed') ? t : null
    }
}
/** What the stand-in image holds now: detections of each class with a similarity, and all. */
Closure<Map> holding = {
    Map perClass = [:]
    getDetectionObjects().each { PathObject p ->
        if (p.getMeasurementList().containsKey('similarity')) {
            String c = p.getPathClass() == null ? 'none' : p.getPathClass().toString()
            perClass.put(c, ((perClass.get(c) ?: []) as List) + [p.getMeasurementList().get('similarity')])
        }
    }
    return perClass
}

if (System.getProperty('panel.steps') == 'jobs') {  // Train, then Predict with the model trained
    report.train = click('train')
    report.predict = click('predict')
    report.objects = fx { getDetectionObjects().size() + getAnnotationObjects().size() }
    new File(System.getProperty('panel.report')).setText(groovy.json.JsonOutput.toJson(report), 'UTF-8')
    println('[driver] done')
    return
}

report.suggest = click('suggest')
List<String> classes = (List<String>) fx {
    node('sliders').getChildrenUnmodifiable().findAll { it instanceof Slider }.collect { it.getId().substring('slider-'.length()) }
}
report.classes = classes
report.sliders = classes.collectEntries { String c ->
    Slider s = (Slider) node('slider-' + c)
    [(c): [min: fx { s.getMin() }, max: fx { s.getMax() }, value: fx { s.getValue() }, count: text('count-' + c)]]
}
report.after_suggest = fx { holding() }

String c = classes[0]
Slider slider = (Slider) node('slider-' + c)
Closure<Map> move = { double value ->
    fx { slider.setValue(value) }
    return [value: value, count: text('count-' + c), label: text('value-' + c), holding: fx { holding() }]
}
report.steps << move(1.0)
report.steps << move((double) fx { slider.getMin() })
List sims = ((List) ((Map) fx { holding() }).get(c)).sort().reverse()
report.third = sims[2]
report.steps << move((double) sims[2])
// the user rejects the best candidate: moving the slider does not hide it any more
PathObject best = (PathObject) fx {
    getDetectionObjects().findAll { PathObject p -> p.getPathClass()?.toString() == c }
            .max { PathObject p -> p.getMeasurementList().get('similarity') }
}
fx { best.setPathClass(PathClass.fromString('Rejected suggestion')) }
report.rejected_id = best.getID().toString()
report.steps << move(1.0)
report.steps << move((double) sims[2])

fx { ((CheckBox) node('heatmap')).setSelected(true) }
report.heatmap_class = fx { node('heatmap-class').getValue() }

String snapshot = System.getProperty('panel.snapshot')
if (snapshot) {
    fx {
        def image = stage.getScene().snapshot(null)
        ImageIO.write(SwingFXUtils.fromFXImage(image, null), 'png', new File(snapshot))
    }
}
report.review = click('review')
report.background = click('background')
report.after_background = fx { holding() }
new File(System.getProperty('panel.report')).setText(groovy.json.JsonOutput.toJson(report), 'UTF-8')
println('[driver] done')
