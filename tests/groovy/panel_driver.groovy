/*
 * Test support (not QuPath): drives the window simsearch_panel.groovy opened, as a user would,
 * in the same JVM (run it after the panel with the launcher's --fx). Writes what it saw to the
 * JSON file -Dpanel.report=..., and a snapshot of the window to -Dpanel.snapshot=... (PNG).
 *
 * Steps: wait for the window and the server check; Suggest; per class note the sliders and the
 * shown candidates; move the first class's slider to 1, to its floor, to the 3rd candidate's
 * similarity; reject the best candidate and move the slider to 1 again; show the heat map;
 * snapshot; Review; Background; delete a shown candidate and move the slider down and back;
 * relabel a candidate (not reviewed) and Suggest again; open the image -Dpanel.second_uri=...,
 * move the (first image's) slider, Suggest there and move the new slider.
 * With -Dpanel.steps=jobs: Train, then Predict.
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
import standin.ImageState

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

report.rule = fx { node('rule').getValue() }
report.candidates = fx { node('candidates').getValue() }
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
report.overlay = ImageState.get().overlay  // what the viewer shows now

String snapshot = System.getProperty('panel.snapshot')
if (snapshot) {
    fx {
        def image = stage.getScene().snapshot(null)
        ImageIO.write(SwingFXUtils.fromFXImage(image, null), 'png', new File(snapshot))
    }
}
report.review = click('review')
fx { node('candidates').setValue('grid') }  // Background sends the Candidates choice too
report.background = click('background')
report.candidates_after_background = new groovy.json.JsonSlurper().parse(
        new File(System.getProperty('simsearch.session'), 'session.json')).candidates
report.after_background = fx { holding() }

// the user deletes a shown candidate: moving the slider down and back does not bring it back
Closure<List> detectionsOf = { def h, String k ->
    (List) fx { h.getDetectionObjects().findAll { PathObject p -> p.getPathClass()?.toString() == k } }
}
def first = fx { getCurrentHierarchy() }
PathObject gone = (PathObject) detectionsOf(first, c).min { PathObject p -> p.getMeasurementList().get('similarity') }
fx { first.removeObjects([gone], true) }
report.deleted_id = gone.getID().toString()
move((double) fx { slider.getMin() })
report.after_delete = move((double) sims[2])
report.after_delete.ids = fx { getDetectionObjects().collect { it.getID().toString() } }

// the user gives a shown candidate another class and, without Review, Suggests again
String d = classes[1]
PathObject relabelled = (PathObject) detectionsOf(first, c)[0]
fx { relabelled.setPathClass(PathClass.fromString(d)) }
report.relabelled_id = relabelled.getID().toString()
report.relabelled_to = d
report.before_suggest2 = detectionsOf(first, c).collect { it.getID().toString() }
report.suggest2 = click('suggest')
report.after_suggest2 = [
        ids: fx { getDetectionObjects().collect { it.getID().toString() } },
        classes: fx { getDetectionObjects().collectEntries { [(it.getID().toString()): it.getPathClass()?.toString()] } },
        count: text('count-' + c)]

// another image is opened: its heat map goes, the first image's sliders do nothing until Suggest
List<String> firstIds = (List<String>) fx { first.getDetectionObjects().collect { it.getID().toString() }.sort() }
fx { ImageState.get().switchTo([System.getProperty('panel.second_uri')], []) }
Map sw = [overlay: ImageState.get().overlay]
Slider old = (Slider) node('slider-' + c)
fx { old.setValue(old.getMin()) }
sw.status = text('job-status')
sw.first_unchanged = fx { first.getDetectionObjects().collect { it.getID().toString() }.sort() } == firstIds
sw.second_detections = fx { getDetectionObjects().size() }
sw.suggest = click('suggest')
Slider now = (Slider) node('slider-' + c)
fx { now.setValue(1.0d) }
sw.at_one = [count: text('count-' + c), holding: fx { holding() }]
fx { now.setValue(now.getMin()) }
sw.at_floor = [count: text('count-' + c), holding: fx { holding() }]
sw.first_still_unchanged = fx { first.getDetectionObjects().collect { it.getID().toString() }.sort() } == firstIds
sw.overlay_drawn = ImageState.get().overlay != null
report.switch = sw
new File(System.getProperty('panel.report')).setText(groovy.json.JsonOutput.toJson(report), 'UTF-8')
println('[driver] done')
